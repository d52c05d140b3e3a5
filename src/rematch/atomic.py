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
import re
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


#: Longest file name component and path most file systems accept (Linux: NAME_MAX, PATH_MAX).
NAME_MAX, PATH_MAX = 255, 4096


def check_path_length(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse a path the file system cannot hold (a name over 255 bytes, a path over 4095), with
    its length, instead of an ENAMETOOLONG error that carries the whole 5,000-character path."""
    path = Path(path)
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    total = len(os.fsencode(path))
    if total >= PATH_MAX or longest > NAME_MAX:
        raise ReplaceRefusedError(f"{flag} {str(path)[:60]}...: the path is too long ({total} bytes, longest name "
                                  f"{longest} bytes; the file system allows names of {NAME_MAX} and paths of "
                                  f"{PATH_MAX - 1}); choose a shorter path")
    return path


def check_replaceable(target: Path, is_ours: Callable[[Path], bool], what: str, overwrite: bool = False,
                      own_entry: Callable[[str], bool] | None = None) -> None:
    """Refuse to replace ``target`` unless it is absent, an empty directory, or ``what`` we wrote
    before (``is_ours``). ``overwrite`` no longer widens this (it once let any folder be
    replaced); callers keep passing it for their own checks, such as replacing another format.

    Replacing a directory deletes everything in it: pointing ``--out`` at a folder of one's
    own files by mistake must cost an error message, not the files -- ``--overwrite`` included,
    which replaces what rematch wrote, never the user's files (issue 27). With ``own_entry``
    (the names ``what`` may hold) an entry it does not name -- the user's notes beside a saved
    model, their own subset in a generated world -- is refused as well, even inside a folder
    that is ours.
    """
    target = Path(target)
    if not (target.exists() or target.is_symlink()):
        return
    never = "--overwrite never replaces files rematch did not write"
    if not target.is_dir() or target.is_symlink():
        raise ReplaceRefusedError(f"{target} exists and is a file, not {what}; refusing to replace it: choose a new "
                                  f"or empty directory ({never})")
    entries = sorted(entry.name for entry in target.iterdir())
    if not entries:
        return
    if own_entry is not None:
        foreign = [name for name in entries if not own_entry(name)]
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ReplaceRefusedError(f"{target} holds files that are not part of {what} ({shown}); refusing to "
                                      f"replace (and so delete) them ({never}): move them away, or choose a new or "
                                      "empty directory")
    if not is_ours(target):
        raise ReplaceRefusedError(f"{target} is not empty and does not hold {what}; refusing to replace (and so "
                                  f"delete) it ({never}): choose a new or empty directory")


def write_directory_atomically(target: Path, write: Callable[[Path], None], *, is_ours: Callable[[Path], bool],
                               what: str, overwrite: bool = False,
                               own_entry: Callable[[str], bool] | None = None) -> None:
    """Run ``write(tmp_dir)`` then move the finished directory to ``target`` in one rename.

    An existing ``target`` is replaced only as :func:`check_replaceable` allows; it is moved
    aside first and deleted only after the new one is in place, so at every instant either
    the old or the new complete directory exists. The remains of an earlier write that was
    killed (``kill -9``) before its rename are removed first.
    """
    target = check_path_length(target, "output path")
    check_replaceable(target, is_ours, what, overwrite, own_entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(target)
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


def remove_dead_leftovers(target: Path) -> None:
    """Delete ``.<name>.tmp-<pid>-<tag>`` / ``.old-`` siblings of ``target`` whose writing process
    is gone: what a write killed before its rename (or its clean-up) leaves behind."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(?:tmp|old)-(\d+)-[0-9a-f]{8}")
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if match and not _process_alive(int(match.group(1))):
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


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
