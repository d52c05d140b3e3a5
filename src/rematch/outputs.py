"""Where a command may write: the one rule every output path of rematch follows.

Why: commands once wrote their files into whatever folder ``--out`` named, so a user's own
``summary.md`` or ``train.jsonl`` that happened to carry an output's name was replaced, and
``--overwrite`` / ``--resume`` on a folder that was not a run deleted or rewrote what was in
it. The rule (README, "Command line"):

* a command writes only into a directory that is new, empty, or marked as that command's own
  output by :data:`MARKER`, a small file written *first*, which names the command and every
  entry it wrote there (with the size, and for files up to :data:`HASHED_BYTES` the sha256);
* an entry is replaced only when the marker records it and it is unchanged since (a folder:
  nothing added inside it); a file the marker does not record (the user's) is never
  replaced, ``--overwrite`` or not;
* a single-file output that exists is refused unless ``--overwrite``
  (:func:`check_new_file`);
* a path too long for the file system is refused before any work (:func:`check_path_length`).

Directories written before the marker existed are adopted by a command's own recogniser
(``adopt``: e.g. result files that carry a model fingerprint), so reruns and resumes of
earlier outputs keep working.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from rematch.atomic import ReplaceRefusedError, check_path_length, write_json_atomically

#: The marker file of an output directory.
MARKER = ".rematch-output.json"
#: Marker format version.
MARKER_FORMAT = 1
#: Files up to this size are recorded with their sha256 (reports, results); larger ones by size.
HASHED_BYTES = 4 << 20
#: A folder entry is recorded with the paths in it up to this many (a shapes world's images fit).
LISTED_ENTRIES = 20_000

#: ``adopt(directory) -> names``: the entries of an unmarked directory that a command recognises
#: as its own output from before markers (empty: none, the directory is not its output).
Adopt = Callable[[Path], Iterable[str]]


class OutputRefusedError(ReplaceRefusedError):
    """An output path holds something that is not this command's to write over (the user's files)."""


__all__ = ["MARKER", "OutputDirectory", "OutputRefusedError", "check_new_file", "check_path_length", "claim_outputs",
           "json_records_with", "read_marker"]


def check_new_file(path: str | os.PathLike, what: str, overwrite: bool = False, flag: str = "--out") -> Path:
    """A single-file output: new, or an existing regular file replaced only with ``overwrite``."""
    path = check_path_length(path, flag)
    if path.is_dir():
        raise OutputRefusedError(f"{path} is a directory; give the path of a file to write {what} to")
    if not (path.exists() or path.is_symlink()):
        return path
    if not path.is_file():
        raise OutputRefusedError(f"{path} exists and is not a regular file; refusing to write {what} there")
    if not overwrite:
        raise OutputRefusedError(f"{path} exists; refusing to replace it: choose a new path, or pass --overwrite "
                                 "(overwrite=True) to replace it")
    return path


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _record_of(path: Path) -> dict:
    """What the marker keeps of one entry: a directory with what is in it (up to
    :data:`LISTED_ENTRIES` paths), a file by size (and sha256 when small)."""
    if path.is_dir() and not path.is_symlink():
        listing = _listing(path)
        return {"dir": True, "entries": listing} if len(listing) <= LISTED_ENTRIES else {"dir": True}
    size = path.stat().st_size
    record: dict = {"size": size}
    if size <= HASHED_BYTES:
        record["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return record


def _unchanged(path: Path, record: dict | None) -> bool:
    """Whether an entry the marker records is still what rematch wrote (None: being written, ours)."""
    if record is None or not (path.exists() or path.is_symlink()):
        return True
    if record.get("dir"):  # something the user added inside makes it theirs too; a removal does not
        listed = record.get("entries")
        return path.is_dir() and (listed is None or set(_listing(path)) <= set(listed))
    if not path.is_file() or path.stat().st_size != record.get("size"):
        return False
    digest = record.get("sha256")
    return digest is None or hashlib.sha256(path.read_bytes()).hexdigest() == digest


def read_marker(directory: Path) -> dict | None:
    """The marker of ``directory`` (None: there is none); a damaged one is an error naming it."""
    marker = directory / MARKER
    if not (marker.exists() or marker.is_symlink()):
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise OutputRefusedError(f"{marker} is damaged ({error}); it records what rematch wrote in {directory}: "
                                 "choose another output directory") from error
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("command"), str) or not isinstance(files, dict) \
            or not all(isinstance(v, dict) or v is None for v in files.values()):
        raise OutputRefusedError(f"{marker} is not a rematch output record; choose another output directory")
    return data


@dataclass
class OutputDirectory:
    """A directory a command has claimed for its output (see the module docstring).

    Call :meth:`will_write` with the entry names before writing them, :meth:`remove` to
    delete an entry it recorded, and :meth:`seal` after the files are written.
    """

    path: Path
    command: str
    files: dict[str, dict | None] = field(default_factory=dict)

    @classmethod
    def inspect(cls, path: str | os.PathLike, command: str, *, adopt: Adopt | None = None,
                flag: str = "--out") -> "OutputDirectory":
        """Check that ``command`` may write into ``path`` without writing anything (every process of
        a distributed run can call it; only one then :meth:`claim`-s)."""
        path = check_path_length(path, flag)
        hint = "choose a new or empty directory"
        if path.exists() and not path.is_dir() or path.is_symlink() and not path.exists():
            raise OutputRefusedError(f"{path} exists and is not a directory; {hint} for {flag}")
        if not path.exists():
            return cls(path, command)
        marker = read_marker(path)
        if marker is not None:
            if marker["command"] != command:
                raise OutputRefusedError(f"{path} holds the output of `rematch {marker['command']}`, not of "
                                         f"`rematch {command}`; {hint}")
            return cls(path, command, dict(marker["files"]))
        entries = sorted(entry.name for entry in path.iterdir())
        if not entries:
            return cls(path, command)
        adopted = set(adopt(path)) if adopt is not None else set()
        if adopted:
            return cls(path, command, {name: None for name in sorted(adopted) if name in entries})
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise OutputRefusedError(f"{path} is not empty ({shown}) and holds no output of `rematch {command}`; "
                                 f"refusing to write into it (--overwrite never replaces files rematch did not "
                                 f"write): {hint}")

    @classmethod
    def claim(cls, path: str | os.PathLike, command: str, *, adopt: Adopt | None = None,
              flag: str = "--out") -> "OutputDirectory":
        """:meth:`inspect`, then create the directory and write its marker (before any output)."""
        claimed = cls.inspect(path, command, adopt=adopt, flag=flag)
        claimed.path.mkdir(parents=True, exist_ok=True)
        claimed._save()
        return claimed

    def owns(self, name: str) -> bool:
        """Whether the entry ``name`` is rematch's to replace: recorded, and unchanged since."""
        return name in self.files and _unchanged(self.path / name, self.files[name])

    def check(self, *names: str) -> None:
        """Refuse if any of ``names`` exists and is not this command's recorded, unchanged output."""
        for name in names:
            target = self.path / name
            if name == MARKER or os.sep in name or name in ("", ".", ".."):
                raise ValueError(f"not an output entry name: {name!r}")
            if not (target.exists() or target.is_symlink()):
                continue
            if name not in self.files:
                raise OutputRefusedError(f"{target} exists and was not written by `rematch {self.command}`; "
                                         "refusing to replace it (--overwrite never replaces files rematch did not "
                                         "write): move it away, or choose another output directory")
            if not _unchanged(target, self.files[name]):
                raise OutputRefusedError(f"{target} was changed after `rematch {self.command}` wrote it; refusing "
                                         "to replace it: move it away, or choose another output directory")

    def will_write(self, *names: str) -> None:
        """:meth:`check` the entries, then record them (as being written) before they are written."""
        self.check(*names)
        new = [name for name in names if name not in self.files or self.files[name] is not None]
        for name in new:
            self.files[name] = None
        if new:
            self._save()

    def remove(self, name: str) -> None:
        """Delete an entry this command recorded (never one it did not); a missing one is fine."""
        import shutil

        self.check(name)
        target = self.path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        self.files.pop(name, None)
        self._save()

    def seal(self) -> None:
        """Record the size (and small files' sha256) of every entry written, so a later change by
        the user is seen as theirs."""
        for name in list(self.files):
            target = self.path / name
            if target.exists():
                self.files[name] = _record_of(target)
            else:
                self.files.pop(name)
        self._save()

    def _save(self) -> None:
        write_json_atomically(self.path / MARKER, {"format": MARKER_FORMAT, "command": self.command,
                                                   "files": dict(sorted(self.files.items()))})


def json_records_with(*keys: str, also: Iterable[str] = ()) -> Adopt:
    """An ``adopt`` for result folders from before markers: the ``*.json`` files whose content is
    a JSON object with all of ``keys`` (e.g. ``model_fingerprint``), plus ``also`` beside them
    when any was found (the Markdown and plot rendered from the same summary)."""

    def adopt(directory: Path) -> set[str]:
        found = set()
        for path in directory.glob("*.json"):
            try:
                if path.stat().st_size > HASHED_BYTES:
                    continue
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and all(key in record for key in keys):
                found.add(path.name)
        if found:
            found |= {name for name in also if (directory / name).is_file()}
        return found

    return adopt


def claim_outputs(path: str | os.PathLike, command: str, names: Iterable[str], *, adopt: Adopt | None = None,
                  flag: str = "--out") -> OutputDirectory:
    """Claim ``path`` for ``command`` and record the entries ``names`` it is about to write; every
    refusal comes before anything is written (call on the writing process only)."""
    names = list(names)
    OutputDirectory.inspect(path, command, adopt=adopt, flag=flag).check(*names)
    outputs = OutputDirectory.claim(path, command, adopt=adopt, flag=flag)
    outputs.will_write(*names)
    return outputs
