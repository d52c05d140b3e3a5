"""The training step's parameter bookkeeping and its matching plan, on tiny real models (one process)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from rematch import ReMatchModel
from rematch.backbones.attention import mask_for_kernel, masked_attention
from rematch.config import ConfigError, LossConfig, load_config
from rematch.losses import LossWeights, ReMatchLoss, matching_loss, yes_no_logits
from rematch.matching import MatchSample, build_packed_batch, match_logits, matching_inputs, pair_kinds
from rematch.training.collate import TrainCollator
from rematch.data.items import Item
from rematch.data.records import TrainExample
from rematch.demo.pipeline import row_config
from rematch.demo.settings import BACKBONES, RANDOM_BACKBONE, ROWS, DemoSettings
from rematch.model import EmbeddingOutput
from rematch.training.gradcache import GradCache
from rematch.training.loop import prepare_model
from rematch.training.matching_diagnostics import VIEW_METRICS, matching_by_view, split_view_metrics
from rematch.training.step import (
    ReMatchTrainingModule,
    document_identity,
    freeze_parameters_without_loss,
    vision_parameters,
)
from rematch.world.scenes import Scene, ShapeObject, render

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


def test_a_training_step_with_matching_moves_the_projector_centre_and_one_without_does_not():
    model = ReMatchModel.tiny(num_tokens=2, seed=0)
    examples = [TrainExample(Item(f"question {i}"), Item(f"answer {i}"), (Item(f"other {i}"),)) for i in range(3)]
    batch = TrainCollator(model)(examples)
    before = model.projector.center.clone()
    ReMatchTrainingModule(model, LossConfig(matching=0.0), seed=0)(batch)
    torch.testing.assert_close(model.projector.center, before)
    module = ReMatchTrainingModule(model, LossConfig(matching=0.1, matching_samples=0), seed=0)
    module.eval()(batch)  # an evaluation pass measures, it does not move the centre
    torch.testing.assert_close(model.projector.center, before)
    module.train()(batch)
    assert float(model.projector.center_updates) == 1.0
    with torch.no_grad():  # the first observed batch sets the centre to its 9 embeddings' mean
        embedded = [model.embed(b, role).embedding for b, role in
                    ((batch.queries, "query"), (batch.positives, "document"), (batch.negatives, "document"))]
    torch.testing.assert_close(model.projector.center, torch.cat(embedded).mean(dim=0), atol=1e-4, rtol=1e-4)


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



# ------------------------------------------------------------------ the matching loss's vocabulary

MATCHING_INSTRUCTION = "Does the document match the query? Answer only Yes or No."


def _match_samples() -> list[MatchSample]:
    def picture(colour: str) -> Image.Image:
        return render(Scene((ShapeObject(colour, "circle", "large", 0.5, 0.5),)), side=56)

    return [MatchSample(Item(text="a large red circle"), (Item(image=picture("red")), Item(image=picture("blue"))),
                        (True, False)),
            MatchSample(Item(text="<|image_1|> What colour is the circle?", image=picture("green")),
                        (Item(text="purple"), Item(text="green")), (False, True))]


def _packed(model):
    batch = build_packed_batch(model.adapter, _match_samples(), model.config.system_prompt, MATCHING_INSTRUCTION)
    soft = F.normalize(torch.randn(6, model.hidden_size, generator=torch.Generator().manual_seed(0)), dim=-1)
    return batch, soft


def test_yes_no_matching_is_the_two_way_loss_on_the_yes_no_rows(tiny_model):
    """``yes_no`` (the default) is today's loss: the logits match_logits gives (the two LM-head
    rows), and the 2-way cross-entropy over them, to the bit."""
    assert LossConfig().matching_vocabulary == "yes_no"
    module = ReMatchTrainingModule(tiny_model, LossConfig())
    batch, soft = _packed(tiny_model)
    with torch.no_grad():
        logits = module.answer_logits(batch, soft)
        assert torch.equal(logits, match_logits(tiny_model, batch, soft))
        term = ReMatchLoss(LossWeights(0.0, 0.0, 1.0))(soft[:2], soft[:2], None, None, logits, batch.labels)
    assert torch.equal(term["matching"], F.cross_entropy(logits.reshape(-1, 2).float(), batch.labels))


def test_full_vocabulary_matching_is_transformers_own_cross_entropy_at_the_answer_positions(tiny_model):
    """``full`` (the paper's L_qdm) equals the loss the causal LM's own forward computes over its
    full logits at every position, with labels ("Yes"/"No") at the answer positions only; the
    step computes the vocabulary logits at those positions alone."""
    module = ReMatchTrainingModule(tiny_model, LossConfig(matching_vocabulary="full"))
    ids = (tiny_model.yes_token_id, tiny_model.no_token_id)
    assert module.answer_token_ids == ids
    batch, soft = _packed(tiny_model)
    causal_lm = tiny_model.adapter.causal_lm(tiny_model.backbone)
    vocabulary = causal_lm.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        logits = module.answer_logits(batch, soft)
        assert logits.shape == (2, 8, vocabulary)
        ours = ReMatchLoss(LossWeights(0.0, 0.0, 1.0), answer_token_ids=ids)(
            soft[:2], soft[:2], None, None, logits, batch.labels)["matching"]
        # transformers: one forward over every position; a label at position t + 1 scores the
        # logits at t, so one padding column (seen by nothing) follows the last answer
        embeds, _ = matching_inputs(tiny_model, batch, soft)
        rows, length, width = embeds.shape
        embeds = torch.cat([embeds, embeds.new_zeros(rows, 1, width)], dim=1)
        mask = torch.zeros(rows, length + 1, length + 1, dtype=torch.bool)
        mask[:, :length, :length] = batch.block_mask
        mask[:, length, length] = True
        positions = torch.cat([batch.position_ids, batch.position_ids[:, :, -1:] + 1], dim=2)
        labels = torch.full((rows, length + 1), -100)
        labels[batch.answer_rows, batch.answer_cols + 1] = torch.tensor(ids)[batch.labels]
        with masked_attention(causal_lm) as kernel:
            attention = mask_for_kernel(mask[:, None], kernel, embeds.dtype)
            output = causal_lm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, labels=labels,
                               use_cache=False)
    assert output.logits.shape == (rows, length + 1, vocabulary)
    torch.testing.assert_close(logits.reshape(-1, vocabulary), output.logits[batch.answer_rows, batch.answer_cols])
    assert ours.item() == pytest.approx(output.loss.item(), rel=1e-5)
    # reranking's p(Yes) / (p(Yes) + p(No)) reads the same two columns the 2-way loss uses
    torch.testing.assert_close(yes_no_logits(logits, ids), match_logits(tiny_model, batch, soft).reshape(-1, 2))
    # the generative loss spends probability on the other tokens too: never below the 2-way one
    two_way = matching_loss(yes_no_logits(logits, ids), batch.labels, reduction="none")
    assert (matching_loss(logits, batch.labels, reduction="none", answer_token_ids=ids) >= two_way - 1e-6).all()
    # the per-view metrics use the configured vocabulary: weighted by pair counts they give the loss
    views = matching_by_view(logits, batch.labels, pair_kinds(2), ids, torch.device("cpu"))
    counts = Counter(pair_kinds(2))
    weighted = sum(counts[k] * views[f"matching_loss/{k}"] for k in counts) / sum(counts.values())
    assert weighted.item() == pytest.approx(ours.item(), rel=1e-6)


def test_a_full_vocabulary_step_trains_the_projector_and_logs_the_views():
    model = ReMatchModel.tiny(num_tokens=2, seed=0)
    module = ReMatchTrainingModule(model, LossConfig(matching=0.1, matching_vocabulary="full"), seed=0)
    batch = TrainCollator(model)([TrainExample(Item("a red circle"), Item("red circle"), (Item("blue star"),)),
                                  TrainExample(Item("a blue star"), Item("blue star"), (Item("red circle"),))])
    terms = module(batch, 0)
    terms["loss"].backward()
    assert model.projector.mlp[0].weight.grad.abs().sum() > 0
    assert set(VIEW_METRICS) <= set(terms)
    losses, metrics = split_view_metrics(terms)
    assert set(metrics) == set(VIEW_METRICS) and not set(VIEW_METRICS) & set(losses)
    total = terms["contrastive"] + 0.5 * terms["orthogonality"] + 0.1 * terms["matching"]
    assert terms["loss"].item() == pytest.approx(total.item(), rel=1e-6)  # metrics are not in the objective
    with pytest.raises(ConfigError, match="matching_vocabulary"):
        load_config("configs/demo-tiny.yaml", ["loss.matching_vocabulary=vocabulary"])
    for recipe in sorted(Path("configs").glob("rematch-*.yaml")):
        assert load_config(recipe).loss.matching_vocabulary == "full", recipe.name
    assert load_config("configs/demo-tiny.yaml").loss.matching_vocabulary == "yes_no"
