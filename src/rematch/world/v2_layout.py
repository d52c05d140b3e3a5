"""Where the built-in world's video and page subsets go on disk, in MMEB-V2's published layout.

MMEB-V2 (VLM2Vec's ``experiments/public/eval/{video,visdoc}.yaml``) keeps three things apart:
row tables (Hugging Face datasets, one per task), frames (``video-tasks/frames/<family>/<Task>/
<video_id>/*``) and page images (``<image_root>/<corpus-id>.png``); which reader reads a task
and where its roots are is configuration, not data. The world writes the same three things
under its own root (tables as local parquet files) and, since its tasks are not MMEB-V2's,
a ``task.json`` in each task directory that says what the harness config would: the reader
family, the report category, the roots and the split (the descriptor
:mod:`rematch.evaluation.mmeb_v2.tasks` reads), so ``rematch eval mmeb-v2`` finds them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

VIDEO_DIR = "video-tasks"
VISDOC_DIR = "visdoc-tasks"
#: The file in a task directory that describes the task (family, category, roots, split).
DESCRIPTOR = "task.json"


def write_table(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` as one parquet file (through a temporary name, so no half file is left)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        raise ValueError(f"{path}: refusing to write an empty table")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist([dict(row) for row in rows]), tmp)
    os.replace(tmp, path)


def write_task_descriptor(task_dir: Path, described: Mapping[str, Any]) -> None:
    """Write ``<task_dir>/task.json``: ``family``, ``category``, roots relative to the data root, ``split``."""
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / DESCRIPTOR).write_text(json.dumps(dict(described), indent=2) + "\n", encoding="utf-8")


__all__ = ["DESCRIPTOR", "VIDEO_DIR", "VISDOC_DIR", "write_table", "write_task_descriptor"]
