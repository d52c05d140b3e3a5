"""Read user item files (corpora, query sets) into ids, items and per-item metadata.

Formats:

* a ``.jsonl`` file, one object per line: ``id`` (required, unique), ``text``, ``image``
  (a path), ``instruction``; every other field is kept as metadata and returned with
  search results;
* a directory of ``.jsonl`` files (read in name order, as one corpus);
* a directory of images (no ``.jsonl`` inside): one image item per file, id = the
  path relative to the directory.

Relative image paths resolve against ``image_root`` if given, else against the
directory of the jsonl file, and are stored absolute (an index stays usable from any
working directory). Every image must exist when the file is read, so a typo
fails in seconds rather than hours into encoding; errors name the file, line and field.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from rematch.data.items import Item, ItemError, as_item

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ITEM_FIELDS = ("text", "image", "instruction")


class CorpusError(ValueError):
    """A corpus or query file is malformed; the message names the file, line and field."""


def json_object(line: str, where: str) -> dict:
    """One jsonl line as a JSON object; anything else is a :class:`CorpusError` naming ``where``."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise CorpusError(f"{where}: not valid JSON ({error})") from error
    except RecursionError:  # "[[[[...": the parser recurses once per level
        raise CorpusError(f"{where}: not valid JSON (nested too deeply)") from None
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def check_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path if it is a regular file (symlinks followed), else a clear error.

    A FIFO or a device (``/dev/zero``) named as an input would block forever or be read
    until memory runs out; a directory or a symlink loop fails with a message about
    something else. ``open`` is never reached for those.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    except OSError as error:  # a symlink loop, a path through a file, no permission
        raise CorpusError(f"{path}: cannot open the {what}: {error.strerror or error}") from error
    if stat.S_ISDIR(mode):
        raise CorpusError(f"{path} is a directory, not a {what}")
    if not stat.S_ISREG(mode):
        raise CorpusError(f"{path} is not a regular file (a FIFO, socket or device?); give a {what}")
    return path


def iter_jsonl(path: str | os.PathLike, what: str = "jsonl file") -> Iterator[tuple[int, dict]]:
    """``(line number, row)`` for every non-blank line of a jsonl file (errors say "FILE line N").

    Lines are decoded one by one, so a file that is not UTF-8 text (a binary, UTF-16) is an
    error naming its line rather than a bare codec message; a UTF-8 byte-order mark, as
    some editors write, is accepted.
    """
    path = check_regular_file(path, what)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise CorpusError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start}); "
                                  "jsonl files must be UTF-8") from None
            if line.strip():
                yield number, json_object(line, where)


@dataclass
class Corpus:
    """Items with their ids and the extra fields of their rows, in file order."""

    ids: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    """``file line N`` of each item, for error messages."""
    skipped: list[str] = field(default_factory=list)
    """Entries of a corpus folder that look like inputs (by name) but are not regular files
    (a FIFO, a socket, a broken link, a symlink loop), each described: counted and reported,
    never silently left out."""

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, other: "Corpus") -> None:
        self.ids += other.ids
        self.items += other.items
        self.metadata += other.metadata
        self.sources += other.sources
        self.skipped += other.skipped


def _warn(message: str) -> None:
    print(f"rematch: note: {message}", file=sys.stderr)


def read_corpus(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                instruction: str | None = None, log: Callable[[str], None] | None = _warn) -> Corpus:
    """A jsonl file, a directory of jsonl files, or a directory of images (see module docstring).

    ``instruction`` is given to every item whose row has none. Entries of a folder that are
    not regular files (FIFOs, symlink loops...) are counted in ``Corpus.skipped`` and reported
    through ``log`` (default: a note on stderr).
    """
    path = Path(path)
    if path.is_file():
        corpus = read_jsonl_items(path, image_root, instruction)
    elif path.is_dir():
        files, skipped = _regular_files(path.rglob("*.jsonl"))
        if files:
            corpus = Corpus(skipped=skipped)
            for file in files:
                corpus.extend(read_jsonl_items(file, image_root, instruction))
        else:
            corpus = read_image_directory(path, instruction)
            corpus.skipped = skipped + corpus.skipped
        if corpus.skipped and log is not None:
            shown = "; ".join(corpus.skipped[:3]) + ("; ..." if len(corpus.skipped) > 3 else "")
            log(f"{path}: skipped {len(corpus.skipped)} entr{'y' if len(corpus.skipped) == 1 else 'ies'} that "
                f"{'is' if len(corpus.skipped) == 1 else 'are'} not a regular file: {shown}")
    elif path.exists() or path.is_symlink():  # a FIFO, a device, a broken link: check_regular_file says which
        corpus = read_jsonl_items(path, image_root, instruction)
    else:
        raise CorpusError(f"{path}: no such file or directory")
    if not corpus.ids:
        raise CorpusError(f"{path}: no items found")
    _check_unique(corpus)
    return corpus


def read_jsonl_items(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                     instruction: str | None = None) -> Corpus:
    """One jsonl file of items with ids (duplicate ids are an error)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    corpus = Corpus()
    for number, row in iter_jsonl(path):
        where = f"{path} line {number}"
        row_id = row.get("id")
        if row_id is None or isinstance(row_id, (dict, list, bool)) or (
                isinstance(row_id, float) and not math.isfinite(row_id)):
            raise CorpusError(f"{where}: field 'id' is missing or not a string/number")
        fields = {key: row[key] for key in ITEM_FIELDS if row.get(key) is not None}
        if instruction is not None:
            fields.setdefault("instruction", instruction)
        image = fields.get("image")
        if image is not None:
            if not isinstance(image, str):
                raise CorpusError(f"{where}: field 'image' must be a path string")
            resolved = Path(os.path.abspath(image if os.path.isabs(image) else root / image))
            if not resolved.is_file():
                raise CorpusError(f"{where}: field 'image': image file not found: {resolved}")
            fields["image"] = str(resolved)
        try:
            item = as_item(fields, number, f"{path} line")
        except ItemError as error:
            raise CorpusError(str(error)) from error
        metadata = {k: v for k, v in row.items() if k not in ITEM_FIELDS and k != "id"}
        _check_finite(metadata, where)
        corpus.ids.append(str(row_id))
        corpus.items.append(item)
        corpus.metadata.append(metadata)
        corpus.sources.append(where)
    return corpus


def _check_finite(value, where: str, name: str = "") -> None:
    """Metadata is stored in the index and returned with hits as JSON: a NaN would be written as
    the non-standard token ``NaN`` that strict JSON readers refuse, far from where it came from."""
    if isinstance(value, float) and not math.isfinite(value):
        raise CorpusError(f"{where}: field {name!r} is {value}, which JSON cannot hold; use null or a number")
    if isinstance(value, dict):
        for key, sub in value.items():
            _check_finite(sub, where, f"{name}.{key}" if name else str(key))
    elif isinstance(value, list):
        for position, sub in enumerate(value):
            _check_finite(sub, where, f"{name}[{position}]")


def read_image_directory(path: str | os.PathLike, instruction: str | None = None) -> Corpus:
    """Every image file under ``path`` (recursively, sorted) as an image-only item."""
    path = Path(path)
    files, skipped = _regular_files(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    corpus = Corpus(skipped=skipped)
    for file in files:
        relative = file.relative_to(path).as_posix()
        corpus.ids.append(relative)
        corpus.items.append(Item(image=os.path.abspath(file), instruction=instruction))
        corpus.metadata.append({})
        corpus.sources.append(str(file))
    return corpus


def _regular_files(paths: Iterable[Path]) -> tuple[list[Path], list[str]]:
    """The regular files among ``paths`` (sorted), and a description of each other entry that
    is not a directory: what a folder scan must report rather than drop."""
    files, skipped = [], []
    for candidate in sorted(paths):
        try:
            mode = os.stat(candidate).st_mode
        except OSError as error:  # a broken link, a symlink loop
            kind = "a symlink loop" if error.errno == errno.ELOOP else "a broken link" \
                if candidate.is_symlink() else f"unreadable ({error.strerror or error})"
            skipped.append(f"{candidate} ({kind})")
            continue
        if stat.S_ISREG(mode):
            files.append(candidate)
        elif not stat.S_ISDIR(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
            skipped.append(f"{candidate} ({kind})")
    return files, skipped


def _check_unique(corpus: Corpus) -> None:
    seen: dict[str, str] = {}
    for item_id, source in zip(corpus.ids, corpus.sources):
        if item_id in seen:
            raise CorpusError(f"{source}: duplicate id {item_id!r} (first at {seen[item_id]})")
        seen[item_id] = source
