"""The training step's parameter bookkeeping and its matching plan, on tiny real models (one process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from rematch import ReMatchModel
from rematch.config import LossConfig, load_config
from rematch.training.collate import TrainCollator
from rematch.data.items import Item
from rematch.data.records import TrainExample
from rematch.demo.pipeline import row_config
from rematch.demo.settings import BACKBONES, RANDOM_BACKBONE, ROWS, DemoSettings
from rematch.model import EmbeddingOutput
from rematch.training.gradcache import GradCache
from rematch.training.loop import prepare_model
from rematch.training.step import (
    ReMatchTrainingModule,
    document_identity,
    freeze_parameters_without_loss,
    vision_parameters,
)

# ------------------------------------------------------------------ in-batch fallback negatives


def test_document_identity_ignores_case_spacing_and_end_punctuation_but_not_content(tmp_path):
    assert document_identity(Item("Yes")) == document_identity(Item(" yes. ")) == document_identity(Item("YES!"))
    assert document_identity(Item("A red  circle,\nlarge.")) == document_identity(Item("a red circle, large"))
    assert document_identity(Item("red circle")) != document_identity(Item("blue circle"))
    assert document_identity(Item("e.g. yes")) != document_identity(Item("eg yes"))  # inner punctuation counts
    image = tmp_path / "a.png"
    assert document_identity(Item("Yes", image=str(image))) == document_identity(Item("yes", image=image))
    assert document_identity(Item("Yes", image=str(image))) != document_identity(Item("yes", image="b.png"))
    assert document_identity(Item("Yes", image=str(image))) != document_identity(Item("Yes"))
    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    assert document_identity(Item(image=red)) == document_identity(Item(image=red.copy()))
    assert document_identity(Item(image=red)) != document_identity(Item(image=blue))
    # The instruction says what to do with a document, not what the document is.
    assert document_identity(Item("Yes", instruction="Answer:")) == document_identity(Item("yes"))


def test_in_batch_fallback_never_takes_a_spelling_variant_of_the_positive():
    model = ReMatchModel.tiny(num_tokens=2, seed=0)
    answers = ["Yes", "yes.", "  YES ", "No"]
    examples = [TrainExample(Item(f"question {i}: is it red?"), Item(answer)) for i, answer in enumerate(answers)]
    batch = TrainCollator(model)(examples)
    # Every "yes" spelling is nearly the same vector, so by similarity alone the hardest other
    # positive of a "yes" row would be another "yes".
    vectors = F.normalize(torch.tensor([[1.0, 0.00, 0.0], [1.0, 0.01, 0.0], [1.0, 0.02, 0.0], [0.3, 0.0, 1.0]]), dim=-1)
    embedded = EmbeddingOutput(embedding=vectors, fused=vectors, token_states=vectors[:, None])
    module = ReMatchTrainingModule(model, LossConfig(in_batch_negatives=True), seed=0)
    plan = module.plan_matching(batch, embedded, embedded, None, step=0)
    assert len(plan.samples) == 4 and plan.skipped == 0
    negatives = [next(doc for doc, relevant in zip(s.documents, s.relevant) if not relevant) for s in plan.samples]
    assert [n.text for n in negatives[:3]] == ["No", "No", "No"]
    assert negatives[3].text in answers[:3]

    only_variants = TrainCollator(model)(examples[:3])
    plan = module.plan_matching(only_variants, *(EmbeddingOutput(vectors[:3], vectors[:3], vectors[:3, None]),) * 2,
                                None, step=0)
    assert plan.samples == [] and plan.skipped == 3  # no other document at all: skipped, not a false negative


# ------------------------------------------------------------------ which parameters train


@pytest.mark.parametrize("start", BACKBONES)
@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_parameters_no_enabled_loss_reaches_are_frozen_for_every_ablation_row(tmp_path, row, start):
    config = row_config(DemoSettings.create(quick=True, backbone=start), row, seed=0, data_root=Path("unused"),
                        out=tmp_path)
    model = prepare_model(config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert ("query_tokens" in trainable) == ("document_tokens" in trainable) == (config.model.num_tokens > 0)
    assert any(name.startswith("projector.") for name in trainable) == (config.loss.matching > 0)
    backbone = {name for name, _ in model.named_parameters() if name.startswith("backbone.")}
    tower = {name for name in backbone if ".visual." in name}
    assert tower and backbone - tower <= trainable  # the language model trains in full
    # a random tower learns to see; a pretrained one stays as it is (the paper: LoRA on the language model)
    assert tower <= trainable if start == RANDOM_BACKBONE else not tower & trainable


def test_lora_with_matching_off_trains_only_adapters_and_tokens():
    config = load_config("configs/demo-tiny.yaml", ["lora.enabled=true", "lora.r=2", "lora.alpha=4",
                                                    "model.num_tokens=2", "loss.matching=0"])
    model = prepare_model(config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"query_tokens", "document_tokens"} <= trainable
    assert not any(name.startswith("projector.") for name in trainable)
    assert all(name in ("query_tokens", "document_tokens") or "lora_" in name for name in trainable)


def test_an_untied_lm_head_trains_only_with_the_matching_loss():
    for matching, head_trains in ((0.0, False), (0.1, True)):
        model = ReMatchModel.tiny(num_tokens=2, seed=0)
        head = model.adapter.causal_lm(model.backbone).get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone())  # as in Qwen2-VL-7B: not the input table
        frozen = freeze_parameters_without_loss(model, LossConfig(matching=matching))
        assert head.weight.requires_grad == head_trains
        assert ("backbone.lm_head.weight" in frozen) == (not head_trains)
        assert model.adapter.core(model.backbone).get_input_embeddings().weight.requires_grad


def test_a_step_without_images_or_matching_samples_still_gives_every_trainable_parameter_a_gradient():
    """What DDP needs from a rank whose batch is text-only and whose matching plan is empty:
    the vision tower and the matching-only parameters get exact zeros, not no gradient."""
    model = ReMatchModel.tiny(num_tokens=2, seed=0)
    module = ReMatchTrainingModule(model, LossConfig(matching=0.1, in_batch_negatives=False), seed=0)
    batch = TrainCollator(model)([TrainExample(Item("a red circle"), Item("red circle")),
                                  TrainExample(Item("a blue star"), Item("blue star"))])
    assert batch.negatives is None and batch.queries.pixel_values is None
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    matching_only = {id(p) for p in model.projector.parameters()}
    vision = {id(p) for p in vision_parameters(model)}
    for run in ("plain", "gradcache"):
        module.zero_grad(set_to_none=True)
        if run == "plain":
            terms = module(batch, 0)
            terms["loss"].backward()
        else:
            terms = GradCache(module, chunk_size=1).step(batch, 0)
        assert "matching" not in terms  # no pair anywhere: the term is left out, not NaN
        assert {name for name, p in module.named_parameters() if p.grad is not None} == trainable, run
        for p in module.parameters():
            if id(p) in matching_only or id(p) in vision:
                assert not p.grad.any(), run
        assert model.query_tokens.grad.any(), run

