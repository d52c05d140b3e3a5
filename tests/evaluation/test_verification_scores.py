"""Verification is reported by its accuracies at p("Yes") = 0.5 and by a threshold-free
separation (ROC AUC) of true captions from foils.

Why both: the shipped model's accuracies (true captions 87.5%, foils 16.5%) read like a
verifier biased towards "Yes", while its p("Yes") was about 0.505 for every caption, true or
foil (AUC 0.49): it had not learned to verify at all. The AUC says so directly.
"""

from __future__ import annotations

import pytest
import torch

from rematch.training.answers import AnswerCollator, separation_auc, score_examples, yes_no_logits
from rematch.training.pretrain import PretrainConfig, PretrainModelConfig, build_backbone
from rematch.world.pretrain_corpus import heldout_examples


def test_separation_auc_counts_ordered_pairs_and_half_the_ties():
    assert separation_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert separation_auc([0.1, 0.2], [0.9, 0.8]) == 0.0
    assert separation_auc([0.5, 0.5], [0.5]) == 0.5
    # pairs: 0.9 > 0.5, 0.9 > 0.4, 0.4 < 0.5, 0.4 = 0.4 (half) -> 2.5 of 4
    assert separation_auc([0.9, 0.4], [0.5, 0.4]) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        separation_auc([], [0.3])


def test_verification_scores_of_a_real_tiny_backbone_agree_with_its_yes_no_logits():
    config = PretrainConfig(model=PretrainModelConfig(image_size=56))
    backbone, adapter = build_backbone(config)
    examples = [example for example in heldout_examples(6) if example.task == "verify"]
    scores = score_examples(backbone, adapter, examples, config.model.image_size, batch_size=4)

    true, foils = scores.yes_probability["verify/true"], scores.yes_probability["verify/foil"]
    assert len(true) == len(scores.correct["verify/true"]) == 6 and len(foils) == 6
    assert all(0.0 < p < 1.0 for p in true + foils)
    # the accuracies are these probabilities thresholded at 0.5, for each kind
    assert scores.correct["verify/true"] == [p > 0.5 for p in true]
    assert scores.correct["verify/foil"] == [p <= 0.5 for p in foils]
    assert scores.verification_auc() == round(separation_auc(true, foils), 4)
    assert scores.mean_yes_probability("verify/foil") == round(sum(foils) / len(foils), 4)

    # and they are the softmax of the two LM-head rows, example by example
    collate = AnswerCollator(adapter, config.model.image_size)
    yes_id, no_id = adapter.token_id("Yes"), adapter.token_id("No")
    true_examples = [example for example in examples if example.kind == "true"]
    with torch.inference_mode():
        logits = yes_no_logits(backbone.eval(), adapter, collate(true_examples, with_answers=False), yes_id, no_id)
    torch.testing.assert_close(torch.tensor(true, dtype=torch.float64),
                               torch.softmax(logits.double(), dim=-1)[:, 0], rtol=1e-4, atol=1e-6)
