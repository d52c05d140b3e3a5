"""MMEB-V2: the 78 image, video and visual-document tasks, read from their published layouts.

Main entry points::

    from rematch.evaluation.mmeb_v2 import evaluate_mmeb_v2, discover_tasks, OFFICIAL_TASKS

Modules: ``tasks`` (the task registry and report categories), ``tables`` (finding row
files), ``video`` and ``visdoc`` (the readers per task family), ``scoring`` (ranking and
metrics through the shared embedding cache), ``report`` (the summary in the official
layout), ``evaluate`` (the command's driver).
"""

from rematch.evaluation.mmeb_v2.evaluate import discover_tasks, evaluate_mmeb_v2, evaluate_task
from rematch.evaluation.mmeb_v2.records import RankingExample, RankingTask
from rematch.evaluation.mmeb_v2.report import render_markdown_v2, summarize_v2
from rematch.evaluation.mmeb_v2.scoring import evaluate_ranking_task
from rematch.evaluation.mmeb_v2.tasks import (
    CATEGORIES, MODALITIES, OFFICIAL_TASKS, PRIMARY_METRIC, TaskSpec, register_task, task_spec)
from rematch.evaluation.mmeb_v2.video import read_video_task
from rematch.evaluation.mmeb_v2.visdoc import read_visdoc_task

__all__ = ["CATEGORIES", "MODALITIES", "OFFICIAL_TASKS", "PRIMARY_METRIC", "RankingExample", "RankingTask",
           "TaskSpec", "discover_tasks", "evaluate_mmeb_v2", "evaluate_ranking_task", "evaluate_task",
           "read_video_task", "read_visdoc_task", "register_task", "render_markdown_v2", "summarize_v2", "task_spec"]
