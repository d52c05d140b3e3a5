"""``rematch eval mmeb-v2``: find the tasks under a data root, score each, write the V2 report.

Image tasks are MMEB-V1's, scored exactly as ``eval mmeb`` scores them
(:func:`rematch.evaluation.mmeb.evaluate_subset`); video and document tasks are read by
their families' readers and scored by :func:`~rematch.evaluation.mmeb_v2.scoring.evaluate_ranking_task`.
All tasks share one :class:`~rematch.encoding.cache.CachedEncoder`, so the embedding
cache, the input limits and the ``torchrun`` sharding are those of ``eval mmeb``: every
rank reads the rows and encodes a strided shard of the unique items, rank 0 writes
``<Task>.json`` per task and ``summary.json`` / ``summary.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Callable, Sequence

from rematch.atomic import write_json_atomically
from rematch.data.mmeb import iter_eval_examples, split_layout
from rematch.data.validation import BadRowReport, DataError
from rematch.encoding.cache import CachedEncoder, EncodeStats
from rematch.distributed import is_main_process
from rematch.encoding.distributed import gather_stats
from rematch.evaluation.mmeb import (
    SUMMARY_FILES, TIE_RULE, claim_result_directory, evaluate_subset, subset_file_name)
from rematch.evaluation.mmeb_v2.report import summarize_v2, write_summary_v2
from rematch.evaluation.mmeb_v2.scoring import evaluate_ranking_task
from rematch.evaluation.mmeb_v2.tables import describe_places, find_rows
from rematch.evaluation.mmeb_v2.tasks import (
    DESCRIPTOR, EXTRA_TASKS, IMAGE, MODALITIES, OFFICIAL_TASKS, VIDEO, VISDOC, TaskSpec, task_from_descriptor,
    with_fixed_layout)
from rematch.evaluation.mmeb_v2.video import read_video_task
from rematch.evaluation.mmeb_v2.visdoc import read_visdoc_task
from rematch.evaluation.settings import (
    OFFICIAL_MMEB_V2_VIDEO_FRAMES, InputLimits, current_limits, input_limits, limits_preset, video_sampling)

_TOP = {IMAGE: "image-tasks", VIDEO: "video-tasks", VISDOC: "visdoc-tasks"}


def where_rows_are(spec: TaskSpec, root: Path) -> str:
    """Where a task's rows are expected, for messages."""
    if spec.modality == IMAGE:
        return f"{root / _TOP[IMAGE] / spec.name}/test.jsonl|parquet|csv"
    if spec.modality == VIDEO:
        return describe_places([root / spec.rows], spec.split)
    return describe_places([root / t for t in spec.tables], spec.split, table="queries")


def has_data(spec: TaskSpec, root: Path) -> bool:
    """Whether ``root`` holds the task's rows (its frames and pages are checked row by row)."""
    if spec.modality == IMAGE:
        directory = root / _TOP[IMAGE] / spec.name
        return directory.is_dir() and split_layout(directory, spec.split) is not None
    if spec.modality == VIDEO:
        return spec.rows is not None and find_rows([root / spec.rows], spec.split, config=spec.config) is not None
    return find_rows([root / t for t in spec.tables], spec.split, table="queries") is not None


def in_layout_found(spec: TaskSpec, root: Path) -> TaskSpec:
    """``spec`` in the layout ``root`` holds: a task with a corrected dataset (``spec.fixed``, the
    page tasks the harness reads from ``*-page-fixed`` since 2025-11) reads that copy when it is
    there, and its original layout otherwise."""
    if spec.fixed is None:
        return spec
    fixed = with_fixed_layout(spec)
    return fixed if find_rows([root / t for t in fixed.tables], spec.split, table="queries") is not None else spec


def _described_tasks(root: Path) -> dict[str, TaskSpec]:
    """Tasks of one's own: ``<root>/video-tasks/<Name>/task.json`` and ``<root>/visdoc-tasks/<Name>/task.json``."""
    found = {}
    for modality in (VIDEO, VISDOC):
        top = root / _TOP[modality]
        for descriptor in sorted(top.glob(f"*/{DESCRIPTOR}")) if top.is_dir() else []:
            if descriptor.parent.name in OFFICIAL_TASKS:
                raise DataError(f"{descriptor}: {descriptor.parent.name} is an MMEB-V2 task; its layout is fixed")
            try:
                found[descriptor.parent.name] = task_from_descriptor(descriptor.parent, modality, root)
            except ValueError as error:
                raise DataError(str(error)) from error
    return found


def discover_tasks(root: str | os.PathLike, modalities: Sequence[str] = MODALITIES,
                   tasks: Sequence[str] | None = None) -> list[TaskSpec]:
    """The tasks to evaluate: the named ones (each must be there), or every task ``root`` holds."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected an MMEB-V2 data root with image-tasks/, video-tasks/, "
                        "visdoc-tasks/)")
    unknown_modalities = [m for m in modalities if m not in MODALITIES]
    if unknown_modalities:
        raise DataError(f"unknown modality {unknown_modalities[0]!r}; choose from {', '.join(MODALITIES)}")
    known = {name: in_layout_found(spec, root)
             for name, spec in {**OFFICIAL_TASKS, **EXTRA_TASKS, **_described_tasks(root)}.items()}
    if tasks:
        chosen = []
        for name in dict.fromkeys(tasks):
            spec = known.get(name)
            if spec is None:
                raise DataError(f"unknown task {name!r}: not an MMEB-V2 task, not registered, and no "
                                f"{_TOP[VIDEO]}/{name}/{DESCRIPTOR} or {_TOP[VISDOC]}/{name}/{DESCRIPTOR} under {root}")
            if spec.modality not in modalities:
                raise DataError(f"task {name} is a {spec.modality} task, but --modalities is {' '.join(modalities)}")
            if not has_data(spec, root):
                raise DataError(f"task {name}: no rows found (expected {where_rows_are(spec, root)})")
            chosen.append(spec)
        return chosen
    chosen = [spec for spec in known.values() if spec.modality in modalities and has_data(spec, root)]
    if not chosen:
        raise DataError(f"{root}: no MMEB-V2 task found for modalities {' '.join(modalities)} (expected e.g. "
                        f"{where_rows_are(OFFICIAL_TASKS['MSR-VTT'], root)})")
    return chosen


def _evaluate_image_task(encoder: CachedEncoder, spec: TaskSpec, root: Path, image_root: str | None,
                         skip_bad: bool, report: BadRowReport) -> dict:
    examples = iter_eval_examples(str(root / _TOP[IMAGE]), spec.name, image_root=image_root, skip_bad=skip_bad,
                                  report=report, split=spec.split)
    result = evaluate_subset(encoder, spec.name, examples)
    return {**result, "modality": spec.modality, "category": spec.category, "family": spec.family,
            "official": spec.official, "primary_metric": spec.primary_metric,
            "score": result[spec.primary_metric]}


def evaluate_task(encoder: CachedEncoder, spec: TaskSpec, root: str | os.PathLike, *, skip_bad: bool = False,
                  image_root: str | None = None, report: BadRowReport | None = None) -> dict:
    """Read and score one task (a JSON-ready result; ``skipped_rows`` counts the rows ``skip_bad`` skipped)."""
    root = Path(root)
    report = report if report is not None else BadRowReport()
    if spec.modality == IMAGE:
        result = _evaluate_image_task(encoder, spec, root, image_root, skip_bad, report)
    else:
        read = read_video_task if spec.modality == VIDEO else read_visdoc_task
        result = evaluate_ranking_task(encoder, spec, read(spec, root, skip_bad=skip_bad, report=report))
        result["data"] = spec.rows if spec.modality == VIDEO else spec.tables[0]
    result["skipped_rows"] = report.total
    return result


def evaluate_mmeb_v2(model, root: str | os.PathLike, out_dir: str | os.PathLike | None, *,
                     modalities: Sequence[str] = MODALITIES, tasks: Sequence[str] | None = None,
                     skip_bad: bool = False, image_root: str | None = None, batch_size: int = 16,
                     cache_dir: str | os.PathLike | None = None, limits: InputLimits | None = None,
                     video_frames: int | None = OFFICIAL_MMEB_V2_VIDEO_FRAMES,
                     overwrite: bool = False, show_progress: bool = False,
                     log: Callable[[str], None] | None = print) -> dict:
    """Evaluate ``model`` on the MMEB-V2 tasks under ``root`` and write the report to ``out_dir``.

    ``model`` needs ``encode``, ``fingerprint`` and ``config`` (a :class:`~rematch.ReMatchModel`).
    ``modalities`` / ``tasks`` choose what runs (default: every task ``root`` holds).
    ``limits`` are the image/text input limits to encode with for this call (None keeps the
    model's own). ``video_frames`` frames of every video are encoded, taken by the official
    harness's rule (8, as the harness; :func:`rematch.evaluation.settings.video_sampling`;
    None keeps the model's own sampling), recorded as ``video_sampling`` in every result.
    Bad rows raise an error naming file, row and field, or, with ``skip_bad``, are skipped
    and counted (``skipped_rows``). Under ``torch.distributed`` every rank calls this with the
    same arguments and gets the same summary.
    """
    specs = discover_tasks(root, modalities, tasks)
    main = is_main_process()
    outputs = None
    if out_dir is not None and main:
        names = [subset_file_name(spec.name) for spec in specs] + list(SUMMARY_FILES[:2])
        outputs = claim_result_directory(Path(out_dir), "eval mmeb-v2", model.fingerprint(), names, overwrite)
    say = log if (log and main) else (lambda _: None)
    with (input_limits(model, limits) if limits is not None else contextlib.nullcontext()), \
            video_sampling(model, video_frames) as sampling_record:
        effective = current_limits(model)
        limits_record = None
        if effective is not None:
            preset = limits.preset if limits is not None else limits_preset(model, effective)
            limits_record = dataclasses.replace(effective, preset=preset).as_dict()
        encoder = CachedEncoder(model, cache_dir, batch_size=batch_size, show_progress=show_progress and main)
        results, reports = {}, {}
        try:
            for spec in specs:
                reports[spec.name] = BadRowReport()
                result = evaluate_task(encoder, spec, root, skip_bad=skip_bad, image_root=image_root,
                                       report=reports[spec.name])
                result["model_fingerprint"] = encoder.fingerprint
                result["input_limits"] = limits_record
                result["video_sampling"] = sampling_record
                results[spec.name] = result
                if out_dir is not None and main:
                    write_json_atomically(Path(out_dir) / subset_file_name(spec.name), result)
                say(f"{spec.name:<28} {spec.modality:<6} {spec.category:<5} {spec.primary_metric} "
                    f"{100 * result['score']:6.2f}  ({result['count']} queries, {result['seconds']:.1f}s)")
        finally:
            encoder.close()
    stats: EncodeStats = gather_stats(encoder.stats)
    summary = summarize_v2(results, fingerprint=encoder.fingerprint, throughput=stats.as_dict(),
                           input_limits=limits_record, tie_rule=TIE_RULE, video_sampling=sampling_record)
    if out_dir is not None and main:
        write_summary_v2(summary, out_dir)
        outputs.seal()
    say(f"All {100 * summary['all']['score']:.2f} over {summary['all']['tasks']} task(s); " + ", ".join(
        f"{m} {100 * row['score']:.2f}" for m, row in summary["modalities"].items()))
    say(f"encoded {stats.encoded} items in {stats.seconds:.1f}s, {stats.cached} served from the embedding cache")
    for name, report in reports.items():
        if report:
            say(f"{name}: {report.summary()}")
    if out_dir is not None:
        say(f"wrote {Path(out_dir) / 'summary.json'}, {Path(out_dir) / 'summary.md'}")
    return summary


__all__ = ["discover_tasks", "evaluate_mmeb_v2", "evaluate_task", "has_data", "in_layout_found"]
