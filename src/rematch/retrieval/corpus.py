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

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

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
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


@dataclass
class Corpus:
    """Items with their ids and the extra fields of their rows, in file order."""

    ids: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    """``file line N`` of each item, for error messages."""

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, other: "Corpus") -> None:
        self.ids += other.ids
        self.items += other.items
        self.metadata += other.metadata
        self.sources += other.sources


def read_corpus(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                instruction: str | None = None) -> Corpus:
    """A jsonl file, a directory of jsonl files, or a directory of images (see module docstring).

    ``instruction`` is given to every item whose row has none.
    """
    path = Path(path)
    if path.is_file():
        corpus = read_jsonl_items(path, image_root, instruction)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if files:
            corpus = Corpus()
            for file in files:
                corpus.extend(read_jsonl_items(file, image_root, instruction))
        else:
            corpus = read_image_directory(path, instruction)
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
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            row = json_object(line, where)
            if "id" not in row or row["id"] is None or isinstance(row["id"], (dict, list, bool)):
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
            corpus.ids.append(str(row["id"]))
            corpus.items.append(item)
            corpus.metadata.append({k: v for k, v in row.items() if k not in ITEM_FIELDS and k != "id"})
            corpus.sources.append(where)
    return corpus


def read_image_directory(path: str | os.PathLike, instruction: str | None = None) -> Corpus:
    """Every image file under ``path`` (recursively, sorted) as an image-only item."""
    path = Path(path)
    corpus = Corpus()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        relative = file.relative_to(path).as_posix()
        corpus.ids.append(relative)
        corpus.items.append(Item(image=os.path.abspath(file), instruction=instruction))
        corpus.metadata.append({})
        corpus.sources.append(str(file))
    return corpus


def _check_unique(corpus: Corpus) -> None:
    seen: dict[str, str] = {}
    for item_id, source in zip(corpus.ids, corpus.sources):
        if item_id in seen:
            raise CorpusError(f"{source}: duplicate id {item_id!r} (first at {seen[item_id]})")
        seen[item_id] = source
