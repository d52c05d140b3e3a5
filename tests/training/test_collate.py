"""Collation of (query, positive, hard negative) examples through a real tiny model, and the
bad-row policy for images that only turn out unreadable when opened."""

from __future__ import annotations

import shutil

import pytest
import torch

from rematch.training.collate import TrainCollator
from rematch.data.items import Item
from rematch.data.mmeb import open_train_source
from rematch.data.records import RowRef, TrainExample
from rematch.world.tasks import write_shapes_dataset
from rematch.data.validation import DataError
from rematch.instructions import document_items


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("collate") / "world", train_rows=30, eval_queries=1,
                                seed=2, num_candidates=4, image_size=56)


def test_synth_to_disk_to_readers_to_batches(tiny_model, shapes_root):
    source = open_train_source(str(shapes_root), seed=0)
    examples = source.take(6)
    batch = TrainCollator(tiny_model, report=source.report)(examples)
    assert len(batch) == 6 and batch.refs == [e.ref for e in examples]
    assert batch.subsets == [e.subset for e in examples]
    assert batch.query_items == [e.query for e in examples]
    assert batch.negative_items == [e.negatives[0] for e in examples] and batch.negative_owner == list(range(6))
    expected = tiny_model.prepare(document_items(batch.positive_items, batch.subsets, tiny_model.config),
                                  role="document")
    assert torch.equal(batch.positives.input_ids, expected.input_ids)
    images = sum(item.image is not None for item in batch.query_items)
    assert (batch.queries.image_grid_thw is None) == (images == 0)
    if images:
        assert batch.queries.image_grid_thw.shape[0] == images
    with torch.no_grad():
        for prepared, role in ((batch.queries, "query"), (batch.positives, "document"), (batch.negatives, "document")):
            output = tiny_model.embed(prepared, role)
            assert output.embedding.shape == (6, tiny_model.hidden_size) and torch.isfinite(output.embedding).all()


def test_examples_without_negatives_and_all_negatives(tiny_model):
    examples = [
        TrainExample(Item(text="q0"), Item(text="d0"), (Item(text="n0a"), Item(text="n0b")), "S", RowRef("f", 0)),
        TrainExample(Item(text="q1"), Item(text="d1"), (), "S", RowRef("f", 1)),
        TrainExample(Item(text="q2"), Item(text="d2"), (Item(text="n2"),), "S", RowRef("f", 2)),
    ]
    first = TrainCollator(tiny_model)(examples)
    assert [i.text for i in first.negative_items] == ["n0a", "n2"] and first.negative_owner == [0, 2]
    assert len(first.negatives) == 2
    every = TrainCollator(tiny_model, all_negatives=True)(examples)
    assert [i.text for i in every.negative_items] == ["n0a", "n0b", "n2"] and every.negative_owner == [0, 0, 2]
    none = TrainCollator(tiny_model)(examples[1:2])
    assert none.negatives is None and none.negative_owner == []


def _examples_with_a_corrupt_positive(tmp_path, shapes_root):
    root = tmp_path / "world"
    shutil.copytree(shapes_root, root)
    examples = open_train_source(str(root), subsets=["ShapesT2I"], seed=0).take(4)
    with open(examples[2].positive.image, "wb") as handle:  # corrupted after reading, before collating
        handle.write(b"\x89PNG\r\n\x1a\n truncated")
    return examples


def test_unreadable_image_raises_with_row_and_field(tiny_model, tmp_path, shapes_root):
    examples = _examples_with_a_corrupt_positive(tmp_path, shapes_root)
    with pytest.raises(DataError, match=rf"{examples[2].ref.source} row {examples[2].ref.row}: "
                                        r"field 'pos_image_path': .*cannot read image"):
        TrainCollator(tiny_model)(examples)


def test_unreadable_image_is_skipped_and_counted_with_skip_bad(tiny_model, tmp_path, shapes_root):
    examples = _examples_with_a_corrupt_positive(tmp_path, shapes_root)
    collator = TrainCollator(tiny_model, skip_bad=True)
    batch = collator(examples)
    assert batch.refs == [examples[i].ref for i in (0, 1, 3)] and len(batch.negatives) == 3
    assert collator.report.counts["unreadable image"] == 1 and collator.report.total == 1
    assert f"row {examples[2].ref.row}: field 'pos_image_path'" in collator.report.summary()
