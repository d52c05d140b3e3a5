"""Target-side (document) instructions: the table, where they are applied, and that a saved
model keeps the table it was trained with."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rematch import ReMatchModel
from rematch.config import ModelConfig
from rematch.data.collate import TrainCollator
from rematch.data.items import Item
from rematch.data.mmeb_subsets import MMEB_SUBSETS, MMEB_TRAIN_SUBSETS
from rematch.data.records import RowRef, TrainExample
from rematch.demo.settings import SUBSETS as SHAPES_SUBSETS
from rematch import instructions
from rematch.instructions import (
    BUILTIN_DOCUMENT_INSTRUCTIONS,
    DEFAULT_KEY,
    document_instruction,
    document_items,
    resolved_table,
)


def test_every_mmeb_train_eval_and_shapes_subset_has_its_own_entry():
    names = set(MMEB_SUBSETS) | set(MMEB_TRAIN_SUBSETS) | {"ImageNet_1K"} | set(SHAPES_SUBSETS)
    assert len(MMEB_SUBSETS) == 36 and len(MMEB_TRAIN_SUBSETS) == 20
    missing = sorted(names - set(BUILTIN_DOCUMENT_INSTRUCTIONS))
    assert not missing
    assert all(text.strip() and text.endswith(".") for text in BUILTIN_DOCUMENT_INSTRUCTIONS.values())


def test_items_get_their_subsets_instruction_unless_they_have_one_or_the_switch_is_off():
    config = ModelConfig()
    items = [Item(text="tench"), Item(text="two", instruction="mine"), Item(text="x")]
    result = document_items(items, ["ImageNet-1K", "OK-VQA", "NoSuchSubset"], config)
    assert [i.instruction for i in result] == [BUILTIN_DOCUMENT_INSTRUCTIONS["ImageNet-1K"], "mine",
                                               BUILTIN_DOCUMENT_INSTRUCTIONS[DEFAULT_KEY]]
    assert [i.text for i in result] == ["tench", "two", "x"]
    off = dataclasses.replace(config, document_instructions=False)
    assert document_items(items, "ImageNet-1K", off) == items
    assert document_instruction("ImageNet-1K", off) is None
    with pytest.raises(ValueError, match="2 subset names for 3 items"):
        document_items(items, ["a", "b"], config)


def test_a_config_table_adds_and_replaces_entries_and_a_complete_table_stands_alone():
    config = ModelConfig(document_instruction_table={"MyTask": "Represent the recipe.", "OK-VQA": "Answer."})
    table = resolved_table(config)
    assert table["MyTask"] == "Represent the recipe." and table["OK-VQA"] == "Answer."
    assert table["ChartQA"] == BUILTIN_DOCUMENT_INSTRUCTIONS["ChartQA"]
    complete = ModelConfig(document_instruction_table={DEFAULT_KEY: "Represent it."})
    assert document_instruction("ChartQA", complete) == "Represent it."


def test_training_batches_carry_the_instruction_on_documents_only(tiny_model):
    examples = [TrainExample(Item(text="a red circle"), Item(text="red circle"), (Item(text="blue circle"),),
                             "ShapesCLS", RowRef("f", 0)),
                TrainExample(Item(text="what colour?"), Item(text="red"), (), "ShapesVQA", RowRef("f", 1))]
    tokenizer = tiny_model.processor.tokenizer

    def texts(batch) -> list[str]:
        return [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch.input_ids, batch.attention_mask)]

    batch = TrainCollator(tiny_model)(examples)
    positives, negatives, queries = texts(batch.positives), texts(batch.negatives), texts(batch.queries)
    assert BUILTIN_DOCUMENT_INSTRUCTIONS["ShapesCLS"] in positives[0] and BUILTIN_DOCUMENT_INSTRUCTIONS["ShapesCLS"] in negatives[0]
    assert BUILTIN_DOCUMENT_INSTRUCTIONS["ShapesVQA"] in positives[1]
    assert not any("Represent the given" in text for text in queries)
    assert batch.positive_items[0].instruction is None  # the matching branch reads the raw content

    baseline = ReMatchModel.tiny(k=0, pooling="last", document_instructions=False)
    plain = TrainCollator(baseline)(examples)
    assert not any("Represent the given" in text for text in texts(plain.positives))


def test_a_saved_model_keeps_its_table_when_the_builtin_one_changes(tmp_path, monkeypatch):
    model = ReMatchModel.tiny(k=2)
    assert model.config.document_instruction_table[DEFAULT_KEY] == BUILTIN_DOCUMENT_INSTRUCTIONS[DEFAULT_KEY]
    documents = [Item(text="a small blue star"), Item(text="two")]
    before = model.encode(documents, role="document")
    explicit = model.encode([dataclasses.replace(d, instruction=BUILTIN_DOCUMENT_INSTRUCTIONS[DEFAULT_KEY])
                             for d in documents], role="document")
    np.testing.assert_allclose(before, explicit, atol=1e-6)  # encode applies the default document instruction
    model.save_pretrained(tmp_path / "m")
    monkeypatch.setitem(instructions.BUILTIN_DOCUMENT_INSTRUCTIONS, DEFAULT_KEY, "Something else entirely.")
    loaded = ReMatchModel.from_pretrained(tmp_path / "m")
    np.testing.assert_allclose(loaded.encode(documents, role="document"), before, atol=1e-5)
    assert ReMatchModel.tiny(k=2).config.document_instruction_table[DEFAULT_KEY] == "Something else entirely."
