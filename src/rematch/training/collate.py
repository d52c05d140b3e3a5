"""Training batches: (query, positive, hard negative) examples -> padded model inputs.

Images are opened here, in the collate step (so in DataLoader workers when there are
any), not when rows are read. An image that turns out to be unreadable is therefore first
seen here, and the collator applies the same bad-row policy as the readers: raise a
:class:`~rematch.data.validation.DataError` naming the row and the field, or -- with
``skip_bad`` -- drop that example from the batch and count it in the shared report.

Negatives: with ``all_negatives=False`` (the ReMatch recipe: one hard negative per
sample) each example contributes its first negative, if it has one. Examples without a
negative contribute none; ``negative_owner[j]`` says which example negative ``j`` belongs
to, so the loss can still treat every negative as a negative for every query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from rematch.backbones.base import EncoderBatch
from rematch.data.images import ImageLoadError
from rematch.data.items import Item, ItemError
from rematch.data.records import RowRef, TrainExample
from rematch.data.validation import (
    EMPTY_TEXT,
    MISSING_IMAGE,
    PLACEHOLDER_MISMATCH,
    SCHEMA,
    UNREADABLE_IMAGE,
    BadRowReport,
    DataError,
    RowProblem,
)
from rematch.instructions import document_items


@dataclass
class TrainBatch:
    """One training batch, prepared for the model, plus the raw items (the matching branch
    re-reads them to build its packed sequences)."""

    queries: EncoderBatch
    positives: EncoderBatch
    negatives: EncoderBatch | None
    negative_owner: list[int]
    """For each row of ``negatives``: the index of the example (query) it belongs to."""
    query_items: list[Item]
    positive_items: list[Item]
    negative_items: list[Item]
    refs: list[RowRef | None]
    subsets: list[str] = field(default_factory=list)
    matching_views: Any = None
    """:class:`rematch.matching.MatchingViews` of every item, tokenised from the already
    processed images (collators built with ``matching=True``); None: the step makes them."""
    image_features: list | None = None
    """Per image or video of the step (queries', positives', negatives' visual inputs in row order):
    the frozen vision tower's output, filled in by :mod:`rematch.training.vision_cache`; None: not computed."""

    def __len__(self) -> int:
        return len(self.query_items)


class TrainCollator:
    """Callable on a list of :class:`TrainExample`; returns a :class:`TrainBatch`.

    ``model`` is a :class:`rematch.ReMatchModel` (only its ``prepare`` is used: no forward
    pass happens here). Share ``report`` with the training source so one summary covers
    the bad rows found while reading and while collating.
    """

    def __init__(self, model, skip_bad: bool = False, report: BadRowReport | None = None,
                 all_negatives: bool = False, with_negatives: bool = True, matching: bool = False):
        self.model = model
        self.matching = matching  # True: also tokenise the matching branch's views here (off the training thread)
        self.skip_bad = skip_bad
        self.report = report if report is not None else BadRowReport()
        self.all_negatives = all_negatives
        self.with_negatives = with_negatives  # False: ignore the rows' hard negatives entirely

    def __call__(self, examples: Sequence[TrainExample]) -> TrainBatch:
        examples = list(examples)
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        try:
            return self._build(examples)
        except ItemError as error:
            batch_error = error
        # Something in the batch is bad: find which example (and field), then apply the policy.
        good = []
        for position, example in enumerate(examples):
            problem = self._first_problem(example, position)
            if problem is None:
                good.append(example)
            else:
                self.report.handle(problem, self.skip_bad)
        if len(good) == len(examples):  # no single item fails on its own: not a row problem
            raise batch_error
        if not good:
            raise DataError(f"every example of this batch was bad; {self.report.summary()}")
        return self._build(good)

    # ------------------------------------------------------------------ pieces

    def _negatives_of(self, example: TrainExample) -> tuple[Item, ...]:
        if not self.with_negatives:
            return ()
        return example.negatives if self.all_negatives else example.negatives[:1]

    def _build(self, examples: list[TrainExample]) -> TrainBatch:
        queries = [e.query for e in examples]
        positives = [e.positive for e in examples]
        negatives, owner = [], []
        for index, example in enumerate(examples):
            for negative in self._negatives_of(example):
                negatives.append(negative)
                owner.append(index)
        prepare = self.model.prepare
        subsets = [e.subset for e in examples]
        config = self.model.config
        query_batch = prepare(queries, role="query", where="query")
        positive_batch = prepare(document_items(positives, subsets, config), role="document", where="positive")
        negative_batch = prepare(document_items(negatives, [subsets[i] for i in owner], config), role="document",
                                 where="negative", indices=owner) if negatives else None
        views = None
        if self.matching:
            from rematch.matching import training_views

            views = training_views(self.model.adapter, queries, query_batch, positives, positive_batch, negatives,
                                   negative_batch, owner)
        return TrainBatch(
            queries=query_batch,
            positives=positive_batch,
            negatives=negative_batch,
            matching_views=views,
            negative_owner=owner,
            query_items=queries,
            positive_items=positives,
            negative_items=negatives,
            refs=[e.ref for e in examples],
            subsets=subsets,
        )

    def _first_problem(self, example: TrainExample, position: int) -> RowProblem | None:
        """Prepare each item of one example alone; the first failure, as a row problem."""
        ref = example.ref or RowRef("<in-memory batch>", position)
        negatives = self._negatives_of(example)
        sides = [("query", example.query, "qry", "qry_image_path"),
                 ("document", example.positive, "pos_text", "pos_image_path")]
        for i, negative in enumerate(negatives):
            suffix = f"[{i}]" if len(example.negatives) > 1 else ""
            sides.append(("document", negative, f"neg_text{suffix}", f"neg_image_path{suffix}"))
        for role, item, text_field, image_field in sides:
            if role == "document":
                item = document_items([item], example.subset, self.model.config)[0]
            try:
                self.model.prepare([item], role=role, where=text_field.split("[")[0])
            except ImageLoadError as error:
                reason = MISSING_IMAGE if "not found" in str(error) else UNREADABLE_IMAGE
                field = image_field.replace("image", "video") if item.video is not None else image_field
                return RowProblem(reason, ref, field, str(error))
            except ItemError as error:
                return RowProblem(_reason_of(str(error)), ref, text_field, str(error))
        return None


def _reason_of(message: str) -> str:
    if "placeholder" in message:
        return PLACEHOLDER_MISMATCH
    if "neither text nor image" in message:
        return EMPTY_TEXT
    return SCHEMA
