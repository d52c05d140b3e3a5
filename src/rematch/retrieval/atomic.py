"""Atomic file writes: write a temporary sibling, fsync, then rename over the target.

A reader (or a resumed run) therefore sees either the old complete file or the new
complete file, never a truncated one — which is what lets an interrupted index build or
evaluation resume by trusting whatever files exist. Whole directories are swapped with
:func:`rematch.serialization.write_directory_atomically`.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np


def write_atomically(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``write(handle)`` on a temporary file next to ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomically(path, lambda handle: handle.write(data))


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomically(path, text.encode("utf-8"))


def write_json_atomically(path: str | os.PathLike, value: Any) -> Path:
    return write_text_atomically(path, json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def write_npz_atomically(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    return write_atomically(path, lambda handle: np.savez(handle, **arrays))
