"""Target-side (document) instructions in both styles: B3's inline prefixes by category ("b3", the
default) and the per-subset system-turn table ("system"); where they are applied (training batches,
evaluation, encode), that the demo's baseline row still differs from "+ target instruction", and
that a saved model keeps its style and table."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from rematch import ReMatchModel
from rematch.config import ModelConfig
from rematch.demo.pipeline import row_config
from rematch.demo.settings import ROWS, DemoSettings
from rematch.training.collate import TrainCollator
from rematch.data.items import Item
from rematch.data.mmeb_subsets import MMEB_SUBSETS, MMEB_TRAIN_SUBSETS
from rematch.data.records import EvalExample, RowRef, TrainExample
from tests.support.saved_models import save_as_before
from rematch.demo.settings import SUBSETS as SHAPES_SUBSETS
from rematch import instructions
from rematch.evaluation.mmeb import evaluate_mmeb
from rematch.instructions import (
    BUILTIN_DOCUMENT_INSTRUCTIONS,
    DEFAULT_KEY,
    as_written,
    document_instruction,
    document_items,
    resolved_table,
)

SYSTEM = ModelConfig(target_prompt_style="system")
#: B3's prefixes, as its released data scripts write them (METHOD.md section 2).
B3 = {"classification": "Represent the class label: ", "vqa": "Represent the answer: ",
      "retrieval": "Represent the image caption: "}


# ---------------------------------------------------------------------- the "b3" style

def test_b3_puts_exactly_the_official_prefixes_on_text_targets_and_none_on_image_targets():
    config = ModelConfig()
    assert config.target_prompt_style == "b3"  # the default of new models (and the recipes)
    picture = "crop.png"
    cases = [  # (subset, document, text it must become, or None: unchanged)
        ("ImageNet-1K", Item(text="tench"), B3["classification"] + "tench"),
        ("ImageNet_1K", Item(text="tench"), B3["classification"] + "tench"),  # MMEB-train's spelling
        ("HatefulMemes", Item(text="No"), B3["classification"] + "No"),
        ("OK-VQA", Item(text="two"), B3["vqa"] + "two"),
        ("ScienceQA", Item(text="B"), B3["vqa"] + "B"),
        ("MSCOCO_i2t", Item(text="a dog on a skateboard"), B3["retrieval"] + "a dog on a skateboard"),
        ("VisualNews_i2t", Item(text="Storm hits the coast"), B3["retrieval"] + "Storm hits the coast"),
        ("ShapesCLS", Item(text="red circle"), B3["classification"] + "red circle"),
        ("ShapesVQA", Item(text="red"), B3["vqa"] + "red"),
        ("ShapesI2T", Item(text="a red circle left of a star"), B3["retrieval"] + "a red circle left of a star"),
        # image targets (retrieval images, grounding crops, image + text pages): no instruction at all
        ("MSCOCO_t2i", Item(image=picture), None),
        ("VisDial", Item(image=picture, text="<|image_1|> Represent the given image."), None),
        ("WebQA", Item(image=picture, text="<|image_1|> A passage."), None),
        ("MSCOCO", Item(image=picture), None),
        ("RefCOCO", Item(image=picture), None),
        ("ShapesT2I", Item(image=picture), None),
        ("ShapesGround", Item(image=picture), None),
        ("NoSuchSubset", Item(text="something"), None),  # no category, no prefix
        (None, Item(text="something"), None),
        ("OK-VQA", Item(text="two", instruction="Mine."), None),  # an instruction of its own is kept
    ]
    for subset, document, expected in cases:
        (result,) = document_items([document], subset, config)
        assert result.instruction == document.instruction, subset  # nothing goes to the system turn
        assert result.text == (document.text if expected is None else expected), subset
        assert document_items([result], subset, config) == [result]  # applying it again adds nothing
    assert document_instruction("ImageNet-1K", config) is None
    off = dataclasses.replace(config, document_instructions=False)
    items = [Item(text="tench"), Item(image=picture)]
    assert document_items(items, "ImageNet-1K", off) == items


def test_every_train_and_eval_subset_has_a_b3_category():
    names = set(MMEB_SUBSETS) | set(MMEB_TRAIN_SUBSETS) | {"ImageNet_1K"} | set(SHAPES_SUBSETS)
    assert all(instructions.subset_category(name) is not None for name in names)
    grounding = [name for name in names if instructions.subset_category(name) == "grounding"]
    assert sorted(grounding) == ["MSCOCO", "RefCOCO", "RefCOCO-Matching", "ShapesGround", "Visual7W-Pointing"]
    assert all(instructions.b3_prefix(name) is None for name in grounding)  # grounding targets are images


def decoded(model, batch) -> list[str]:
    tokenizer = model.processor.tokenizer
    return [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch.input_ids, batch.attention_mask)]


class RecordingModel:
    """A model whose ``encode`` records the document items evaluation hands it (then encodes them)."""

    def __init__(self, model):
        self.model, self.config, self.documents = model, model.config, []

    def encode(self, items, role="query", **kwargs):
        if role == "document":
            self.documents += list(items)
        return self.model.encode(items, role=role, **kwargs)

    def fingerprint(self):
        return self.model.fingerprint()


def test_b3_training_batches_and_evaluation_give_the_targets_the_same_text(tiny_model, shape_images):
    """The same target of the same subset becomes the same model input in a training batch and in
    evaluation: text targets with their prefix, image targets with none and the default system turn."""
    model = tiny_model
    assert model.config.target_prompt_style == "b3"
    image = shape_images[0]
    examples = [TrainExample(Item(text="<|image_1|> What is it?", image=image), Item(text="red circle"),
                             (Item(text="blue star"),), "ShapesCLS", RowRef("f", 0)),
                TrainExample(Item(text="what colour?"), Item(text="red"), (), "ShapesVQA", RowRef("f", 1)),
                TrainExample(Item(image=image), Item(text="a red circle"), (), "ShapesI2T", RowRef("f", 2)),
                TrainExample(Item(text="a red circle"), Item(image=image), (), "ShapesT2I", RowRef("f", 3))]
    batch = TrainCollator(model)(examples)
    positives, negatives, queries = decoded(model, batch.positives), decoded(model, batch.negatives), \
        decoded(model, batch.queries)
    assert "user\nRepresent the class label: red circle<|im_end|>" in positives[0]
    assert "user\nRepresent the class label: blue star<|im_end|>" in negatives[0]
    assert "user\nRepresent the answer: red<|im_end|>" in positives[1]
    assert "user\nRepresent the image caption: a red circle<|im_end|>" in positives[2]
    assert "Represent" not in positives[3]  # the image target: no instruction anywhere
    system = f"<|im_start|>system\n{model.config.system_prompt}<|im_end|>"
    assert all(text.startswith(system) for text in positives + negatives)  # nothing in the system turn
    assert not any("Represent" in text for text in queries)
    assert batch.positive_items[0] == Item(text="red circle")  # the matching branch reads the raw content

    for example, trained in zip(examples, positives):  # evaluation: the same target in its own list
        recorder = RecordingModel(model)
        evaluate_mmeb(recorder, {example.subset: [EvalExample(example.query, (example.positive,),
                                                              example.subset, RowRef("e", 0))]}, None, log=None)
        (document,) = recorder.documents
        assert decoded(model, model.prepare([document], role="document")) == [trained], example.subset


def test_the_demo_baseline_row_still_differs_from_the_target_instruction_row(tmp_path):
    """The ablation's "+ target instruction" row turns the style's prefixes on; the baseline has none."""
    baseline_row, target_row = ROWS[0], ROWS[1]
    assert target_row.name == "target_instruction"
    settings = DemoSettings.create(tmp_path, quick=True)
    baseline = row_config(settings, baseline_row, 0, tmp_path, tmp_path / "b").model
    target = row_config(settings, target_row, 0, tmp_path, tmp_path / "t").model
    # the demo runs the library's default style (its README tables were measured with B3's prefixes)
    assert baseline.target_prompt_style == target.target_prompt_style == "b3"
    labels = [Item(text="red circle")]
    assert document_items(labels, "ShapesCLS", baseline) == labels
    (with_instruction,) = document_items(labels, "ShapesCLS", target)  # the subset's B3 prefix
    assert with_instruction.text.endswith(": red circle") and with_instruction.text != "red circle"


def test_as_written_gives_no_target_instruction_in_either_style(tiny_model):
    """The MMEB-V2 candidates: a bare label stays bare and encodes as an item without any instruction
    would under the default system turn, whichever style the model has."""
    for style in ("b3", "system"):
        config = dataclasses.replace(tiny_model.config, target_prompt_style=style)
        (label,) = as_written([Item(text="wave")], config)
        assert label.text == "wave" and document_items([label], "HMDB51", config) == [label]
    plain = tiny_model.adapter.format_item(Item(text="wave"), 2)
    assert tiny_model.adapter.format_item(as_written([Item(text="wave")], tiny_model.config)[0], 2) == plain


# ---------------------------------------------------------------------- the "system" style

def test_every_mmeb_train_eval_and_shapes_subset_has_its_own_entry():
    names = set(MMEB_SUBSETS) | set(MMEB_TRAIN_SUBSETS) | {"ImageNet_1K"} | set(SHAPES_SUBSETS)
    assert len(MMEB_SUBSETS) == 36 and len(MMEB_TRAIN_SUBSETS) == 20
    missing = sorted(names - set(BUILTIN_DOCUMENT_INSTRUCTIONS))
    assert not missing
    assert all(text.strip() and text.endswith(".") for text in BUILTIN_DOCUMENT_INSTRUCTIONS.values())


def test_items_get_their_subsets_instruction_unless_they_have_one_or_the_switch_is_off():
    config = SYSTEM
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
    config = ModelConfig(target_prompt_style="system",
                         document_instruction_table={"MyTask": "Represent the recipe.", "OK-VQA": "Answer."})
    table = resolved_table(config)
    assert table["MyTask"] == "Represent the recipe." and table["OK-VQA"] == "Answer."
    assert table["ChartQA"] == BUILTIN_DOCUMENT_INSTRUCTIONS["ChartQA"]
    complete = ModelConfig(target_prompt_style="system", document_instruction_table={DEFAULT_KEY: "Represent it."})
    assert document_instruction("ChartQA", complete) == "Represent it."


def test_system_training_batches_carry_the_instruction_on_documents_only():
    model = ReMatchModel.tiny(num_tokens=2, target_prompt_style="system")
    examples = [TrainExample(Item(text="a red circle"), Item(text="red circle"), (Item(text="blue circle"),),
                             "ShapesCLS", RowRef("f", 0)),
                TrainExample(Item(text="what colour?"), Item(text="red"), (), "ShapesVQA", RowRef("f", 1))]
    batch = TrainCollator(model)(examples)
    positives, negatives, queries = decoded(model, batch.positives), decoded(model, batch.negatives), \
        decoded(model, batch.queries)
    assert BUILTIN_DOCUMENT_INSTRUCTIONS["ShapesCLS"] in positives[0]
    assert BUILTIN_DOCUMENT_INSTRUCTIONS["ShapesCLS"] in negatives[0]
    assert BUILTIN_DOCUMENT_INSTRUCTIONS["ShapesVQA"] in positives[1]
    assert not any("Represent the given" in text for text in queries)
    assert batch.positive_items[0].instruction is None  # the matching branch reads the raw content

    baseline = ReMatchModel.tiny(num_tokens=0, pooling="last", document_instructions=False)
    plain = TrainCollator(baseline)(examples)
    assert not any("Represent" in text for text in decoded(baseline, plain.positives))


def test_a_saved_model_keeps_its_table_when_the_builtin_one_changes(tmp_path, monkeypatch):
    model = ReMatchModel.tiny(num_tokens=2, target_prompt_style="system")
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
    fresh = ReMatchModel.tiny(num_tokens=2, target_prompt_style="system")
    assert fresh.config.document_instruction_table[DEFAULT_KEY] == "Something else entirely."


# ---------------------------------------------------------------------- saved models

def test_a_saved_model_records_its_style_and_one_saved_before_styles_loads_as_system(tmp_path):
    model = ReMatchModel.tiny(num_tokens=2)
    model.save_pretrained(tmp_path / "b3")
    meta = json.loads((tmp_path / "b3" / "rematch_config.json").read_text())
    assert meta["model"]["target_prompt_style"] == "b3"
    assert ReMatchModel.from_pretrained(tmp_path / "b3").config.target_prompt_style == "b3"

    old = ReMatchModel.tiny(num_tokens=2, target_prompt_style="system")
    loaded = ReMatchModel.from_pretrained(save_as_before(old, tmp_path / "old", "target_prompt_style"))
    assert loaded.config.target_prompt_style == "system"  # it encodes as it was trained
    assert loaded.fingerprint() == old.fingerprint()  # and its indexes and caches still match it
    documents = [Item(text="two")]
    np.testing.assert_allclose(loaded.encode(documents, role="document"), old.encode(documents, role="document"),
                               atol=1e-5)
    assert model.fingerprint() != ReMatchModel.tiny(num_tokens=2, target_prompt_style="system").fingerprint()
