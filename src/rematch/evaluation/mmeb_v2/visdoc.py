"""Reader of the MMEB-V2 visual-document tasks (ViDoRe v1/v2, VisRAG, ViDoSeek, MMLongBench).

Every document task is in BEIR form: three tables, each ``<table>.jsonl|parquet|csv`` or
a Hugging Face split inside ``<table>/`` (how ``vidore/*_beir`` and
``openbmb/VisRAG-Ret-Test-*`` are published):

* ``queries``: ``query-id``, ``query`` (and ``language`` in ViDoRe v2);
* ``corpus``: ``corpus-id``, ``image`` -- a page image, as a path relative to the task's
  page directory or as embedded image bytes (a Hugging Face ``Image`` cell);
* ``qrels``: ``query-id``, ``corpus-id``, ``score`` -- relevance; only scores > 0 count,
  and a pair judged twice keeps its highest score (as the official harness does). Scores
  are kept as grades, so NDCG@5 is graded where the dataset grades (ViDoRe v2).

A query is text (the task instruction, then the query); every page of the corpus is a
candidate for every query (a "global" ranking), an image item with the harness's candidate
text ("Understand the content of the provided document image."). Page images the corpus
embeds are written once into the page directory, under the name the official harness
uses (``<corpus-id>.png``; VisRAG: the name cut to 50 characters plus a hash), so a
directory prepared by either tool serves both.

ViDoSeek-page and MMLongBench-page: since 2025-11 the harness reads the corrected datasets
``VLM2Vec/ViDoSeek-page-fixed`` and ``VLM2Vec/MMLongBench-page-fixed``. Their snapshot in
``visdoc-tasks/<name>-page-fixed/`` is read when it is there (its pages are saved in that
directory, never mixed with the old copy's pages of the same ids); otherwise the original
layout is read, as before (:func:`rematch.evaluation.mmeb_v2.evaluate.in_layout_found`;
every result names the directory it read as ``data``).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Mapping

from rematch.atomic import write_bytes_atomically
from rematch.data.items import Item
from rematch.data.records import RowRef
from rematch.data.validation import EMPTY_TEXT, MISSING_IMAGE, SCHEMA, BadRowReport, DataError, RowProblem
from rematch.evaluation.mmeb_v2.records import BadRow, RankingExample, RankingTask, with_instruction
from rematch.evaluation.mmeb_v2.tables import iter_rows
from rematch.evaluation.mmeb_v2.tasks import TaskSpec

#: Column names as published (BEIR's hyphenated ones) and the underscore spelling some copies use.
_ALIASES = {"query-id": ("query-id", "query_id"), "corpus-id": ("corpus-id", "corpus_id")}


def _column(row: Mapping[str, Any], name: str, ref: RowRef) -> Any:
    for key in _ALIASES.get(name, (name,)):
        if key in row:
            return row[key]
    raise BadRow(RowProblem(SCHEMA, ref, name, f"missing column (row has: {', '.join(sorted(row)) or 'none'})"))


def _identifier(row: Mapping[str, Any], name: str, ref: RowRef) -> str:
    value = _column(row, name, ref)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise BadRow(RowProblem(SCHEMA, ref, name, f"must be a non-empty string or an integer, got {value!r}"[:200]))
    return str(value)


def page_file_name(corpus_id: str, family: str) -> str:
    """The file name the official harness saves a page under (VisRAG ids are long file names)."""
    if family == "visrag":
        base, extension = os.path.splitext(corpus_id)
        return f"{base[:50]}_{hashlib.md5(corpus_id.encode('utf-8')).hexdigest()[:8]}{extension}"
    return f"{corpus_id}.png"


class VisdocReader:
    """Reads one document task into a :class:`RankingTask` (see the module docstring)."""

    def __init__(self, spec: TaskSpec, root: str | os.PathLike, skip_bad: bool = False,
                 report: BadRowReport | None = None):
        self.spec = spec
        self.root = Path(root)
        self.skip_bad = skip_bad
        self.directories = [self.root / table_dir for table_dir in spec.tables]
        self.pages = self.root / (spec.pages or spec.tables[0])
        self.task = RankingTask(spec.name, report=report if report is not None else BadRowReport())

    def _rows(self, table: str):
        return iter_rows(self.directories, self.spec.split, table=table, report=self.task.report,
                         skip_bad=self.skip_bad)

    def _handle(self, issue: BadRow) -> None:
        self.task.report.handle(issue.problem, self.skip_bad)

    def read(self) -> RankingTask:
        for ref, row in self._rows("corpus"):
            try:
                corpus_id = _identifier(row, "corpus-id", ref)
                page = Item(text=self.spec.candidate_text or None, image=self._page(row, corpus_id, ref))
                self.task.add_candidate(corpus_id, page, str(ref))
            except BadRow as issue:
                self._handle(issue)
        if not self.task.pool:
            raise DataError(f"{self.spec.name}: the corpus has no usable page")
        qrels = self._qrels()
        for ref, row in self._rows("queries"):
            try:
                example = self._query(row, ref, qrels)
            except BadRow as issue:
                self._handle(issue)
                continue
            if example is not None:
                self.task.examples.append(example)
        if not self.task.examples:
            raise DataError(f"{self.spec.name}: no usable query in {' or '.join(map(str, self.directories))}")
        return self.task

    def _page(self, row: Mapping[str, Any], corpus_id: str, ref: RowRef) -> str:
        image = _column(row, "image", ref) if "image" in row else None
        if isinstance(image, str) and image.strip():
            path = Path(image) if os.path.isabs(image) else self.pages / image
            if not path.is_file():
                raise BadRow(RowProblem(MISSING_IMAGE, ref, "image", f"page image not found: {path}"))
            return str(path)
        saved = self.pages / page_file_name(corpus_id, self.spec.family)
        if saved.is_file():
            return str(saved)
        data = image.get("bytes") if isinstance(image, Mapping) else image
        if isinstance(data, (bytes, bytearray)) and data:
            write_bytes_atomically(saved, bytes(data))  # where the official harness keeps it too
            return str(saved)
        raise BadRow(RowProblem(MISSING_IMAGE, ref, "image", f"no page image: the cell holds no path or bytes "
                                  f"and {saved} does not exist"))

    def _qrels(self) -> dict[str, dict[int, float]]:
        """``{query id: {pool index: grade}}`` of the judgements with a score > 0."""
        qrels: dict[str, dict[int, float]] = {}
        for ref, row in self._rows("qrels"):
            try:
                query_id, corpus_id = _identifier(row, "query-id", ref), _identifier(row, "corpus-id", ref)
                raw = _column(row, "score", ref)
                try:
                    score = float(raw)
                except (TypeError, ValueError):
                    raise BadRow(RowProblem(SCHEMA, ref, "score", f"must be a number, got {raw!r}")) from None
                if isinstance(raw, bool) or not math.isfinite(score):
                    raise BadRow(RowProblem(SCHEMA, ref, "score", f"must be a finite number, got {raw!r}"))
                if score <= 0:
                    continue
                index = self.task.index_of(corpus_id)
                if index is None:
                    raise BadRow(RowProblem(SCHEMA, ref, "corpus-id", f"{corpus_id!r} is not in the corpus"))
            except BadRow as issue:
                self._handle(issue)
                continue
            judged = qrels.setdefault(query_id, {})
            judged[index] = max(judged.get(index, 0.0), score)
        return qrels

    def _query(self, row: Mapping[str, Any], ref: RowRef,
               qrels: Mapping[str, dict[int, float]]) -> RankingExample | None:
        if self.spec.language is not None and row.get("language") != self.spec.language:
            return None
        query_id = _identifier(row, "query-id", ref)
        text = _column(row, "query", ref)
        if not isinstance(text, str) or not text.strip():
            raise BadRow(RowProblem(EMPTY_TEXT, ref, "query", f"must be a non-empty string, got {text!r}"[:200]))
        relevant = qrels.get(query_id)
        if not relevant:
            raise BadRow(RowProblem(SCHEMA, ref, "query-id", f"query {query_id!r} has no relevant page in the "
                                      "qrels (no judgement with a score > 0)"))
        query = Item(text=with_instruction(self.spec.instruction, text))
        return RankingExample(query=query, relevant=dict(relevant), candidates=None, ref=ref)


def read_visdoc_task(spec: TaskSpec, root: str | os.PathLike, skip_bad: bool = False,
                     report: BadRowReport | None = None) -> RankingTask:
    """One document task of ``root`` as a :class:`RankingTask` (see the module docstring)."""
    return VisdocReader(spec, root, skip_bad=skip_bad, report=report).read()


__all__ = ["VisdocReader", "page_file_name", "read_visdoc_task"]
