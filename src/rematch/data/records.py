"""The records that flow from data readers to training and evaluation.

Readers (MMEB files, Hugging Face datasets, the built-in shapes world, user files) all
yield these, so the trainer and the evaluator never care where a row came from — yet
every record remembers its file and row, so an error can say exactly which one is bad.
"""

from __future__ import annotations

from dataclasses import dataclass

from rematch.data.items import Item


@dataclass(frozen=True)
class RowRef:
    """Where a record came from: a file (or dataset id / subset) and a 0-based row number."""

    source: str
    row: int

    def __str__(self) -> str:
        return f"{self.source} row {self.row}"


@dataclass(frozen=True)
class TrainExample:
    """One training sample: a query, its positive document and zero or more hard negatives."""

    query: Item
    positive: Item
    negatives: tuple[Item, ...] = ()
    subset: str = ""
    ref: RowRef | None = None


@dataclass(frozen=True)
class EvalExample:
    """One evaluation query with its own candidate list; candidate 0 is the correct one (MMEB)."""

    query: Item
    candidates: tuple[Item, ...]
    subset: str = ""
    ref: RowRef | None = None
