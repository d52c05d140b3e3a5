"""The ``matching`` pre-training objective: verification pairs asked in the matching branch's layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rematch.config import ConfigError
from rematch.model import ReMatchModel
from rematch.matching import match_logits
from rematch.training.checkpoint import TRAINABLE, list_checkpoints
from rematch.training.pretrain import load_pretrain_config, pretrain
from rematch.training.verification import RAW_PAIRS, VerificationCollator, raw_pair_logits, verification_aucs
from rematch.world.pretrain_corpus import (
    SINGLE_ATTRIBUTE_FOILS,
    CorpusSpec,
    heldout_verification_pairs,
    verification_pair,
)


def test_pairs_differ_in_the_stated_way_and_are_a_function_of_their_index():
    spec = CorpusSpec(split="pretrain", seed=3)
    pairs = [verification_pair(spec, index) for index in range(60)]
    assert pairs == [verification_pair(spec, index) for index in range(60)]
    assert {pair.image_query for pair in pairs} == {True, False}
    for pair in pairs:
        assert pair.caption != pair.foil
        if not pair.image_query:  # the true caption against the scene and a scene changed by `kind`
            assert pair.foil_scene is not None and pair.foil_scene != pair.scene
    single = [verification_pair(spec, index, single_object=True) for index in range(30)]
    assert {pair.kind for pair in single} <= set(SINGLE_ATTRIBUTE_FOILS)
    assert all(len(pair.scene.objects) == 1 for pair in single)
    only_colour = [verification_pair(spec, index, foil_kinds=["replace_colour"]) for index in range(10)]
    assert {pair.kind for pair in only_colour} == {"replace_colour"}


@pytest.fixture(scope="module")
def shipped():
    return ReMatchModel.tiny(pretrained=True, num_tokens=4, seed=0)


def test_the_objective_scores_exactly_what_the_matching_head_scores(shipped):
    """Pre-training trains the raw pairs of the packed matching forward: the same logits as the
    ReMatch model's matching branch gives those pairs (its soft views, unseen by them, do not matter)."""
    pairs = heldout_verification_pairs(6)
    collate = VerificationCollator(shipped.adapter, 112, shipped.config.system_prompt,
                                   shipped.config.matching_instruction)
    batch = collate(pairs)
    assert [sample_relevant for sample_relevant in batch.match.labels.view(6, -1)[:, list(RAW_PAIRS)].tolist()] == \
        [[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [1, 0]]  # the true side's slot alternates
    with torch.no_grad():
        ours = raw_pair_logits(shipped.backbone, shipped.adapter, batch.match, shipped.yes_token_id,
                               shipped.no_token_id)
        soft = torch.randn(6 * 3, shipped.hidden_size)
        branch = match_logits(shipped, batch.match, soft)[:, list(RAW_PAIRS)]
    torch.testing.assert_close(ours, branch, rtol=1e-5, atol=1e-5)


def test_held_out_aucs_cover_every_kind_and_stay_in_range(shipped):
    aucs = verification_aucs(shipped.backbone, shipped.adapter, heldout_verification_pairs(12), 112,
                             shipped.config.system_prompt, shipped.config.matching_instruction, batch_size=5)
    assert {"all", "single_attribute"} <= set(aucs) and all(0.0 <= value <= 1.0 for value in aucs.values())
    shipped.backbone.train()
    verification_aucs(shipped.backbone, shipped.adapter, heldout_verification_pairs(2), 112,
                      shipped.config.system_prompt, shipped.config.matching_instruction)
    assert shipped.backbone.training


def test_a_matching_phase_continues_the_shipped_backbone_with_its_tower_frozen(tmp_path):
    overrides = ["model.init_from=tiny-pretrained", "train.batch_size=2", "train.steps=2", "train.save_every=1",
                 "train.keep_last=5", "train.eval_every=2", "train.eval_examples=2", "data.num_workers=0",
                 "train.scheduler=constant", f"train.out={tmp_path}",
                 "data.phases=[{steps: 2, lr: 0.001, objective: matching, single_object: true, freeze_tower: true}]"]
    pretrain(load_pretrain_config("configs/pretrain-tiny.yaml", overrides), show_progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert [row["objective"] for row in rows] == ["matching", "matching"]
    assert all(row["matching_loss"] == row["loss"] and 0.0 <= row["matching_accuracy"] <= 1.0 for row in rows)
    heldout = json.loads((tmp_path / "heldout.jsonl").read_text().splitlines()[-1])
    assert {"matching_auc/all", "matching_auc/single_attribute"} <= set(heldout)
    weights = [load_file(str(path / TRAINABLE)) for path in list_checkpoints(tmp_path / "checkpoints")]
    tower = [name for name in weights[0] if ".visual." in name]
    assert tower and all(torch.equal(weights[0][name], weights[-1][name]) for name in tower)
    shipped_tower = ReMatchModel.tiny(pretrained=True, num_tokens=0).backbone.state_dict()
    name = tower[0].split("backbone.", 1)[-1]
    assert torch.equal(weights[-1][tower[0]].float(), shipped_tower[name].float())  # it started from the shipped weights


def test_a_matching_phase_can_keep_asking_questions_in_the_same_steps(tmp_path):
    overrides = ["model.init_from=tiny-pretrained", "train.batch_size=6", "train.steps=2", "train.eval_every=0",
                 "data.num_workers=0", "train.scheduler=constant", f"train.out={tmp_path}",
                 "data.phases=[{steps: 2, lr: 0.001, objective: matching, freeze_tower: true, matching_share: 0.5,"
                 " task_weights: {colour: 1}}]"]
    pretrain(load_pretrain_config("configs/pretrain-tiny.yaml", overrides), show_progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    for row in rows:  # the step's loss is the sum of its two means, each logged
        assert row["objective"] == "matching"
        assert row["loss"] == pytest.approx(row["matching_loss"] + row["answers_loss"], rel=1e-5)


@pytest.mark.parametrize("phase, message", [
    ("{steps: 2, objective: matching, task_weights: {colour: 1}}", "matching_share < 1"),
    ("{steps: 2, objective: matching, matching_share: 1.5}", "within"),
    ("{steps: 2, task_weights: {colour: 1}, matching_share: 0.5}", "only a matching phase mixes"),
    ("{steps: 2, task_weights: {colour: 1}, foil_kinds: [replace_colour]}", "only a matching phase"),
    ("{steps: 2, objective: matching, foil_kinds: [replace_everything]}", "foil_kinds"),
])
def test_bad_matching_phases_are_named(tmp_path, phase, message):
    with pytest.raises(ConfigError, match=message):
        load_pretrain_config("configs/pretrain-tiny.yaml", [f"train.out={tmp_path}", "train.steps=2",
                                                            f"data.phases=[{phase}]"]).validate()
