"""Finding and streaming the row tables of a task in its published layout.

Row files are what a Hugging Face snapshot holds (``<split>-00000-of-00001.parquet``,
possibly under ``<config>/`` or ``data/``), a plain ``<split>.jsonl|parquet|csv``, or a
``datasets.save_to_disk`` directory; the stores of :mod:`rematch.data.stores` read them
row by row and every row keeps its file and row number for error messages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from rematch.data.mmeb import local_subset, split_layout
from rematch.data.records import RowRef
from rematch.data.stores import TABLE_SUFFIXES, RowReadError
from rematch.data.validation import SCHEMA, BadRowReport, DataError, RowProblem

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def find_rows(directories: Sequence[Path], split: str, config: str | None = None,
              table: str | None = None) -> tuple[str, list[Path]] | None:
    """The layout (kind, paths) of ``split`` of a task's table, searched in order; None if absent.

    Without ``table`` (video rows): ``<dir>/<config>/``, ``<dir>/``, ``<dir>/data/``. With
    ``table`` (a BEIR table: queries, corpus, qrels): ``<dir>/<table>.<suffix>`` or the
    split inside ``<dir>/<table>/``.
    """
    for directory in directories:
        if table is not None:
            for suffix in TABLE_SUFFIXES:
                path = directory / f"{table}{suffix}"
                if path.is_file():
                    return "files", [path]
            places = [directory / table, directory / table / "data"]
        else:
            places = ([directory / config] if config else []) + [directory, directory / "data"]
        for place in places:
            if place.is_dir():
                layout = split_layout(place, split)
                if layout is not None:
                    return layout
    return None


def describe_places(directories: Sequence[Path], split: str, table: str | None = None) -> str:
    """The places :func:`find_rows` looked, for a "not found" message."""
    what = f"{table}.jsonl|parquet|csv or {table}/{split}.*" if table else f"{split}.jsonl|parquet|csv"
    return f"{what} under {' or '.join(str(d) for d in directories)}"


def iter_rows(directories: Sequence[Path], split: str, *, config: str | None = None, table: str | None = None,
              report: BadRowReport, skip_bad: bool) -> Iterator[tuple[RowRef, dict[str, Any]]]:
    """Every parseable row of a task table with its reference; unparseable rows raise or are counted."""
    layout = find_rows(directories, split, config=config, table=table)
    if layout is None:
        raise DataError(f"not found: {describe_places(directories, split, table)}")
    store = local_subset(table or "rows", split, layout, None).open()
    try:
        for index, row in store.iter_rows():
            ref = store.ref(index)
            if isinstance(row, RowReadError):
                report.handle(RowProblem(SCHEMA, ref, "*", str(row)), skip_bad)
                continue
            yield ref, row
    finally:
        store.close()


def frame_directory_has_frames(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory holding at least one image file (a video's frames)."""
    try:
        with os.scandir(path) as entries:
            return any(entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES) for entry in entries)
    except (FileNotFoundError, NotADirectoryError):
        return False


__all__ = ["IMAGE_SUFFIXES", "describe_places", "find_rows", "frame_directory_has_frames", "iter_rows"]
