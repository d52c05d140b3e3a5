"""What the MMEB-V2 readers produce: a ranking task (a candidate pool and its queries).

MMEB-V1 gives every query its own list with the answer first. MMEB-V2 has two kinds of
task, and one record covers both:

* "global" tasks rank every query against one shared pool (video retrieval and
  classification, every document task): ``RankingExample.candidates`` is None;
* "local" tasks rank each query against its own few candidates (video QA, moment
  retrieval, SmthSmthV2): ``candidates`` lists pool indices.

Either way the correct candidates are named by pool index with a relevance grade (1 for
the single answer of hit@1 tasks; the qrels score for documents, graded where the
dataset grades), and a task may have several (MomentSeeker, most document queries).

Items that carry a video travel as item-like dicts (``{"text": ..., "video": ...}``)
and become :class:`~rematch.data.items.Item` objects when the scorer validates them, so
the readers (and their tests) do not depend on how a video is encoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from rematch.data.items import Item, ItemLike
from rematch.data.records import RowRef
from rematch.data.validation import BadRowReport, RowProblem

#: Reason of a row whose video (frame directory or file) is not there.
MISSING_VIDEO = "missing video"


class BadRow(Exception):
    """One problem that condemns the row being read (the reader raises or counts it)."""

    def __init__(self, problem: RowProblem):
        super().__init__(str(problem))
        self.problem = problem


@dataclass(frozen=True)
class RankingExample:
    """One query: the pool indices it is ranked against (None = the whole pool) and the correct ones."""

    query: ItemLike
    relevant: Mapping[int, float]
    candidates: tuple[int, ...] | None = None
    ref: RowRef | None = None


@dataclass
class RankingTask:
    """A task as read: its candidate pool (deduplicated by id), the queries, and the rows skipped."""

    name: str
    examples: list[RankingExample] = field(default_factory=list)
    pool: list[ItemLike] = field(default_factory=list)
    pool_ids: list[str] = field(default_factory=list)
    pool_where: list[str] = field(default_factory=list)
    """Where each pool item was first seen (file and row), for error messages."""
    report: BadRowReport = field(default_factory=BadRowReport)
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def add_candidate(self, candidate_id: str, item: ItemLike, where: str) -> int:
        """The pool index of ``candidate_id``, adding ``item`` on first sight (ids are unique, as in
        the official harness, which keys candidate embeddings by name)."""
        index = self._index.get(candidate_id)
        if index is None:
            index = self._index[candidate_id] = len(self.pool)
            self.pool.append(item)
            self.pool_ids.append(candidate_id)
            self.pool_where.append(where)
        return index

    def index_of(self, candidate_id: str) -> int | None:
        return self._index.get(candidate_id)

    def __len__(self) -> int:
        return len(self.examples)


def media_item(text: str | None = None, image: str | None = None, video: str | None = None) -> ItemLike:
    """An item of text and at most one visual input; video items as a dict (see the module docstring)."""
    if video is not None:
        return {"text": text, "video": video}
    return Item(text=text, image=image)


def with_instruction(instruction: str, text: str | None) -> str:
    """The query text as the benchmark writes it: the task instruction, then the row's text."""
    text = (text or "").strip()
    return f"{instruction.strip()} {text}".strip() if instruction else text


__all__ = ["BadRow", "MISSING_VIDEO", "RankingExample", "RankingTask", "media_item", "with_instruction"]
