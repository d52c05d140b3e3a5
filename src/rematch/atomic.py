"""Atomic writes of files and whole directories: write a temporary sibling, fsync, rename.

A reader (or a resumed run) therefore sees either the old complete file or directory or
the new complete one, never a truncated one -- which is what lets an interrupted index
build, evaluation or training run resume by trusting whatever it finds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
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


class ReplaceRefusedError(FileExistsError):
    """The target path holds something that is not ours to replace (the user's files)."""


def check_replaceable(target: Path, is_ours: Callable[[Path], bool], what: str, overwrite: bool = False) -> None:
    """Refuse to replace ``target`` unless it is absent, an empty directory, ``what`` we wrote
    before (``is_ours``), or the caller says ``overwrite``.

    Replacing a directory deletes everything in it: pointing ``--out`` at a folder of one's
    own files by mistake must cost an error message, not the files.
    """
    target = Path(target)
    if overwrite or not (target.exists() or target.is_symlink()):
        return
    hint = "choose a new or empty directory, or pass --overwrite (overwrite=True) to replace it"
    if not target.is_dir():
        raise ReplaceRefusedError(f"{target} exists and is a file, not {what}; refusing to replace it: {hint}")
    if any(target.iterdir()) and not is_ours(target):
        raise ReplaceRefusedError(f"{target} is not empty and does not hold {what}; refusing to replace (and so "
                                  f"delete) it: {hint}")


def check_file_replaceable(target: str | os.PathLike, is_ours: Callable[[Path], bool], what: str,
                           overwrite: bool = False) -> None:
    """The file counterpart of :func:`check_replaceable`: ``target`` may be new, or a file that
    holds ``what`` (``is_ours``); anything else -- the user's own file, a directory, a device --
    is refused unless ``overwrite`` (a directory or device always)."""
    target = Path(target)
    if target.is_dir():
        raise ReplaceRefusedError(f"{target} is a directory; give the path of a file to write {what} to")
    if not (target.exists() or target.is_symlink()):
        return
    if not target.is_file():
        raise ReplaceRefusedError(f"{target} exists and is not a regular file; refusing to write {what} there")
    if not overwrite and not is_ours(target):
        raise ReplaceRefusedError(f"{target} exists and does not hold {what}; refusing to replace it: choose a new "
                                  "path, or pass --overwrite (overwrite=True) to replace it")


def write_directory_atomically(target: Path, write: Callable[[Path], None], *, is_ours: Callable[[Path], bool],
                               what: str, overwrite: bool = False) -> None:
    """Run ``write(tmp_dir)`` then move the finished directory to ``target`` in one rename.

    An existing ``target`` is replaced only as :func:`check_replaceable` allows; it is moved
    aside first and deleted only after the new one is in place, so at every instant either
    the old or the new complete directory exists.
    """
    target = Path(target)
    check_replaceable(target, is_ours, what, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    old = target.parent / f".{target.name}.old-{tag}"
    try:
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def sha256_of(path: Path) -> str:
    """The file's sha256 hex digest, read in 1 MiB chunks (checksums of shipped and saved files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
