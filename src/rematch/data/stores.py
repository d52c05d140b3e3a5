"""Random access to the rows of one table file, without loading the table.

A training run draws rows in shuffled order from files that can hold millions of rows, so
every store keeps only an *index* in memory (byte offsets for jsonl/csv, row-group
metadata for parquet, the memory-mapped Arrow table for Hugging Face datasets) and decodes
a row when it is asked for. Stores also say how their rows group into *blocks* (parquet
row groups; runs of consecutive lines otherwise): the shuffler draws whole blocks close
together in time, so a parquet row group is decoded once per epoch, not once per row.

Rows come back as plain dicts; a row that cannot even be parsed (bad JSON, a csv record
with the wrong number of cells) raises :class:`RowReadError`, which the MMEB layer turns
into a "schema" problem that names the file and the row.
"""

from __future__ import annotations

import csv
import json
import os
from array import array
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from rematch.data.records import RowRef

#: Rows per locality block for formats without row groups (jsonl, csv, Arrow datasets).
DEFAULT_BLOCK_ROWS = 1024

#: Cells of these columns hold lists; csv writes a list as a JSON array in its cell.
LIST_COLUMNS = ("neg_text", "neg_image_path", "tgt_text", "tgt_img_path")


class RowReadError(Exception):
    """A row could not be parsed at all (e.g. a jsonl line that is not JSON)."""


class RowStore:
    """The interface every store implements (see the module docstring)."""

    #: A short description of where the rows come from (a file path, or dataset id/subset).
    source: str

    def __len__(self) -> int:
        raise NotImplementedError

    def block_starts(self) -> np.ndarray:
        """Row indices where blocks start, plus ``len(self)`` at the end (ascending)."""
        return _even_blocks(len(self), DEFAULT_BLOCK_ROWS)

    def read(self, index: int) -> dict[str, Any]:
        """The row at ``index`` (0-based, < len), decoded now; may raise :class:`RowReadError`."""
        raise NotImplementedError

    def iter_rows(self) -> Iterator[tuple[int, dict[str, Any] | RowReadError]]:
        """All rows in file order, streamed; unparsable rows come back as the error."""
        for index in range(len(self)):
            try:
                yield index, self.read(index)
            except RowReadError as error:
                yield index, error

    def ref(self, index: int) -> RowRef:
        """Where row ``index`` lives (file and 0-based row within that file)."""
        return RowRef(self.source, index)

    def close(self) -> None:
        pass


def _even_blocks(n: int, size: int) -> np.ndarray:
    starts = np.arange(0, n, size, dtype=np.int64)
    return np.append(starts, np.int64(n))


# ---------------------------------------------------------------------- line formats


class _LineIndexedStore(RowStore):
    """Shared machinery of jsonl and csv: a byte offset per row, one open handle, seek to read."""

    def __init__(self, path: str | os.PathLike, limit: int | None = None):
        self.path = Path(path)
        self.source = str(self.path)
        self.limit = limit
        self._offsets: np.ndarray | None = None
        self._handle = None

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = self._build_index()
        return self._offsets

    def _build_index(self) -> np.ndarray:
        raise NotImplementedError

    def _file(self):
        if self._handle is None:
            self._handle = open(self.path, "rb")
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __getstate__(self):  # picklable for DataLoader workers: reopen there
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def line_number(self, index: int) -> int:
        """1-based line of row ``index``, counted on demand (only error messages need it).

        Counting streams the file in 1 MiB chunks from the nearest position already counted,
        so memory stays bounded and the bad rows of a ``skip_bad`` pass (met in file order)
        cost one pass over the file in total, not one pass each.
        """
        target = int(self.offsets[index])
        start, line = getattr(self, "_last_counted", (0, 1))
        if start > target:
            start, line = 0, 1
        with open(self.path, "rb") as handle:
            handle.seek(start)
            remaining = target - start
            while remaining > 0:
                chunk = handle.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                line += chunk.count(b"\n")
                remaining -= len(chunk)
        self._last_counted = (target, line)
        return line


class JsonlStore(_LineIndexedStore):
    """One JSON object per line. Rows are the non-blank lines, numbered from 0."""

    def _build_index(self) -> np.ndarray:
        offsets = array("q")  # 8 bytes a row, not a Python int object's 28+8
        position = 0
        with open(self.path, "rb") as handle:
            for line in handle:
                if line.strip():
                    offsets.append(position)
                    if self.limit is not None and len(offsets) >= self.limit:
                        break
                position += len(line)
        return np.frombuffer(offsets, dtype=np.int64) if offsets else np.zeros(0, dtype=np.int64)

    def read(self, index: int) -> dict[str, Any]:
        handle = self._file()
        handle.seek(int(self.offsets[index]))
        return self._decode(handle.readline(), index)

    def _decode(self, line: bytes, index: int) -> dict[str, Any]:
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RowReadError(f"line {self.line_number(index)} is not valid JSON ({error})") from error
        if not isinstance(row, dict):
            raise RowReadError(f"line {self.line_number(index)} is a JSON {type(row).__name__}, not an object")
        return row

    def iter_rows(self) -> Iterator[tuple[int, dict[str, Any] | RowReadError]]:
        index = 0
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                if self.limit is not None and index >= self.limit:
                    return
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise RowReadError(f"line {number} is a JSON {type(row).__name__}, not an object")
                    yield index, row
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    yield index, RowReadError(f"line {number} is not valid JSON ({error})")
                except RowReadError as error:
                    yield index, error
                index += 1


class CsvStore(_LineIndexedStore):
    """A csv file with a header row. Quoted cells may span lines; list cells hold JSON arrays."""

    def __init__(self, path: str | os.PathLike, limit: int | None = None):
        super().__init__(path, limit)
        self._header: list[str] | None = None

    @property
    def all_columns(self) -> list[str]:
        return self.header

    @property
    def header(self) -> list[str]:
        if self._header is None:
            self._offsets = self._build_index()
        return self._header or []

    def _records(self, handle, start: int) -> Iterator[tuple[int, list[str]]]:
        """(offset, cells) of each record from byte ``start``; csv.reader reads no line ahead."""
        handle.seek(start)
        position = [start]

        def lines():
            while True:
                line = handle.readline()
                if not line:
                    return
                position[0] += len(line)
                yield line.decode("utf-8")

        reader = csv.reader(lines())
        while True:
            record_start = position[0]
            try:
                cells = next(reader)
            except StopIteration:
                return
            yield record_start, cells

    def _build_index(self) -> np.ndarray:
        offsets = array("q")
        with open(self.path, "rb") as handle:
            records = self._records(handle, 0)
            try:
                self._header = next(records)[1]
            except StopIteration:
                self._header = []
                return np.zeros(0, dtype=np.int64)
            for offset, cells in records:
                if not any(cell.strip() for cell in cells):
                    continue
                offsets.append(offset)
                if self.limit is not None and len(offsets) >= self.limit:
                    break
        return np.frombuffer(offsets, dtype=np.int64) if offsets else np.zeros(0, dtype=np.int64)

    def read(self, index: int) -> dict[str, Any]:
        header = self.header
        handle = self._file()
        try:
            _, cells = next(self._records(handle, int(self.offsets[index])))
        except (StopIteration, csv.Error, UnicodeDecodeError) as error:
            raise RowReadError(f"line {self.line_number(index)}: cannot parse csv record ({error})") from error
        return self._to_row(cells, header, index)

    def _to_row(self, cells: list[str], header: list[str], index: int) -> dict[str, Any]:
        if len(cells) != len(header):
            raise RowReadError(f"line {self.line_number(index)}: {len(cells)} cells but the header has "
                               f"{len(header)} columns")
        row: dict[str, Any] = dict(zip(header, cells))
        for column in LIST_COLUMNS:
            value = row.get(column)
            if isinstance(value, str) and value.lstrip().startswith("["):
                try:
                    parsed = json.loads(value)
                except json.JSONDecodeError as error:
                    raise RowReadError(f"line {self.line_number(index)}: column '{column}' looks like a JSON "
                                       f"list but does not parse ({error})") from error
                if isinstance(parsed, list):
                    row[column] = parsed
        return row


# ---------------------------------------------------------------------- parquet


class ParquetStore(RowStore):
    """One parquet file; blocks are its row groups, decoded whole and kept in a small LRU cache.

    Only the ``columns`` the reader needs are decoded (extra columns, like the shapes
    world's scene graphs, cost nothing). Memory is bounded by ``cache_row_groups`` row
    groups of those columns.
    """

    def __init__(self, path: str | os.PathLike, columns: Sequence[str] | None = None, limit: int | None = None,
                 cache_row_groups: int = 8):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.source = str(self.path)
        self._file = pq.ParquetFile(self.path)
        names = self._file.schema_arrow.names
        self.columns = [c for c in columns if c in names] if columns is not None else list(names)
        self.all_columns = list(names)
        metadata = self._file.metadata
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        total = int(starts[-1])
        self._length = total if limit is None else min(total, int(limit))
        self._group_starts = starts
        self.cache_row_groups = max(1, cache_row_groups)
        self._cache: OrderedDict[int, dict[str, list]] = OrderedDict()
        self.decoded_row_groups = 0  # how many row-group decodes happened (locality is testable)

    def __len__(self) -> int:
        return self._length

    def block_starts(self) -> np.ndarray:
        starts = self._group_starts[self._group_starts < self._length]
        return np.append(starts, np.int64(self._length))

    def _group(self, group: int) -> dict[str, list]:
        cached = self._cache.get(group)
        if cached is not None:
            self._cache.move_to_end(group)
            return cached
        table = self._file.read_row_group(group, columns=self.columns)
        decoded = {name: table.column(name).to_pylist() for name in self.columns}
        self.decoded_row_groups += 1
        self._cache[group] = decoded
        while len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return decoded

    def read(self, index: int) -> dict[str, Any]:
        group = int(np.searchsorted(self._group_starts, index, side="right")) - 1
        columns = self._group(group)
        local = index - int(self._group_starts[group])
        return {name: values[local] for name, values in columns.items()}

    def iter_rows(self) -> Iterator[tuple[int, dict[str, Any] | RowReadError]]:
        index = 0
        for batch in self._file.iter_batches(batch_size=DEFAULT_BLOCK_ROWS, columns=self.columns):
            for row in batch.to_pylist():
                if index >= self._length:
                    return
                yield index, row
                index += 1

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        state["_cache"] = OrderedDict()
        return state

    def __setstate__(self, state):
        import pyarrow.parquet as pq

        self.__dict__.update(state)
        self._file = pq.ParquetFile(self.path)


# ---------------------------------------------------------------------- Arrow datasets


class ArrowDatasetStore(RowStore):
    """A Hugging Face ``datasets.Dataset`` (memory-mapped Arrow: random access is cheap)."""

    def __init__(self, dataset, source: str, columns: Sequence[str] | None = None, limit: int | None = None):
        self.all_columns = list(dataset.column_names)
        if columns is not None:
            keep = [c for c in columns if c in dataset.column_names]
            if keep != list(dataset.column_names):
                dataset = dataset.select_columns(keep)
        self.dataset = dataset
        self.source = source
        self._length = len(dataset) if limit is None else min(len(dataset), int(limit))

    def __len__(self) -> int:
        return self._length

    def read(self, index: int) -> dict[str, Any]:
        return dict(self.dataset[int(index)])

    def iter_rows(self) -> Iterator[tuple[int, dict[str, Any] | RowReadError]]:
        for start in range(0, self._length, DEFAULT_BLOCK_ROWS):
            batch = self.dataset[start:min(start + DEFAULT_BLOCK_ROWS, self._length)]
            names = list(batch)
            for offset in range(len(batch[names[0]]) if names else 0):
                yield start + offset, {name: batch[name][offset] for name in names}


# ---------------------------------------------------------------------- several files as one


class ConcatStore(RowStore):
    """Shards of one split (``train-00000-of-00004.parquet`` ...) read as one table."""

    def __init__(self, stores: Sequence[RowStore], source: str, limit: int | None = None):
        self.stores = list(stores)
        self.source = source
        self.all_columns = getattr(self.stores[0], "all_columns", None) if self.stores else None
        sizes = [len(store) for store in self.stores]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        total = int(self._starts[-1])
        self._length = total if limit is None else min(total, int(limit))

    def __len__(self) -> int:
        return self._length

    def _locate(self, index: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def block_starts(self) -> np.ndarray:
        starts = [store.block_starts()[:-1] + self._starts[i] for i, store in enumerate(self.stores)]
        merged = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        merged = merged[merged < self._length]
        return np.append(merged, np.int64(self._length))

    def read(self, index: int) -> dict[str, Any]:
        shard, local = self._locate(index)
        return self.stores[shard].read(local)

    def ref(self, index: int) -> RowRef:
        shard, local = self._locate(index)
        return self.stores[shard].ref(local)

    def iter_rows(self) -> Iterator[tuple[int, dict[str, Any] | RowReadError]]:
        for shard, store in enumerate(self.stores):
            for local, row in store.iter_rows():
                index = int(self._starts[shard]) + local
                if index >= self._length:
                    return
                yield index, row

    def close(self) -> None:
        for store in self.stores:
            store.close()


# ---------------------------------------------------------------------- opening files


TABLE_SUFFIXES = (".jsonl", ".parquet", ".csv")


def open_file_store(path: str | os.PathLike, columns: Sequence[str] | None = None,
                    limit: int | None = None) -> RowStore:
    """A store for one table file, chosen by its suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return JsonlStore(path, limit=limit)
    if suffix == ".csv":
        return CsvStore(path, limit=limit)
    if suffix == ".parquet":
        return ParquetStore(path, columns=columns, limit=limit)
    raise ValueError(f"{path}: unsupported table format {suffix!r}; expected one of {', '.join(TABLE_SUFFIXES)}")


def open_files_store(paths: Sequence[str | os.PathLike], source: str, columns: Sequence[str] | None = None,
                     limit: int | None = None) -> RowStore:
    """One store over one or several files (shards, in the given order)."""
    if len(paths) == 1:
        return open_file_store(paths[0], columns=columns, limit=limit)
    stores = []
    remaining = limit
    for path in paths:
        if remaining is not None and remaining <= 0:
            break
        store = open_file_store(path, columns=columns, limit=remaining)
        stores.append(store)
        if remaining is not None:
            remaining -= len(store)
    return ConcatStore(stores, source=source, limit=limit)


def file_columns(path: str | os.PathLike) -> list[str] | None:
    """Column names of a table file without reading its rows (None if not knowable cheaply)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            return next(csv.reader(handle), [])
    if path.suffix.lower() == ".jsonl":
        with open(path, "rb") as handle:
            for line in handle:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        return None
                    return list(row) if isinstance(row, dict) else None
        return []
    return None


__all__ = ["ArrowDatasetStore", "ConcatStore", "CsvStore", "DEFAULT_BLOCK_ROWS", "JsonlStore", "LIST_COLUMNS",
           "ParquetStore", "RowReadError", "RowStore", "TABLE_SUFFIXES", "file_columns", "open_file_store",
           "open_files_store"]
