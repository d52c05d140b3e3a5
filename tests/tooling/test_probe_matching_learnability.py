"""scripts/probe_matching_learnability.py: the matching branch sees, masks and learns what it should.

A first-order label (a function of the document's soft token alone) must be learned on the
pairs that show that token and stay unreadable on the pairs that do not: a defect in soft-token
injection, in the block mask or in the gradient path would break one or the other.
"""

from __future__ import annotations

import importlib.util
import random
import sys

import pytest
import torch

from tests.support import REPO

SCRIPT = REPO / "scripts" / "probe_matching_learnability.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("probe_matching_learnability_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.slow
def test_a_label_of_the_document_soft_token_is_learned_only_where_that_token_is_seen(probe):
    records = probe.train_probe("document-only", steps=60, eval_every=60, heldout=48, log=lambda _: None)
    auc = records[-1]["auc"]
    assert auc["raw-soft"] >= 0.95 and auc["soft-soft"] >= 0.95  # the answer reads the document's soft token
    assert auc["raw-raw"] == 0.5  # every raw document is the same text: nothing to read, exactly chance
    assert 0.3 <= auc["soft-raw"] <= 0.7  # the other pairs' soft documents are masked from this answer


def test_synthetic_pairs_put_the_relevant_document_in_either_slot(probe):
    table = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    for task in probe.TASKS:
        pairs = probe.make_pairs(task, table, 40, random.Random(0))
        assert pairs.soft.shape == (40 * 3, 16)
        assert {sample.relevant for sample in pairs.samples} == {(True, False), (False, True)}
        if task != "document-only":  # the relevant document carries the query's identity
            for s, sample in enumerate(pairs.samples):
                relevant = 1 + sample.relevant.index(True)
                assert torch.equal(pairs.soft[3 * s], pairs.soft[3 * s + relevant])

    # a hard negative (--negative-cosine) is a near duplicate of the query's identity, at that cosine
    hard = probe.make_pairs("soft-equality", table, 40, random.Random(0), negative_cosine=0.9)
    for s, sample in enumerate(hard.samples):
        irrelevant = 1 + sample.relevant.index(False)
        cosine = torch.dot(hard.soft[3 * s], hard.soft[3 * s + irrelevant])
        assert abs(float(cosine) - 0.9) < 1e-5 and abs(float(hard.soft[3 * s + irrelevant].norm()) - 1) < 1e-5


def test_shared_identities_have_the_mean_cosine_asked_for(probe):
    for shared in (0.0, 0.8):
        table = probe.identity_table(256, 128, shared, seed=0)
        similarity = table @ table.T
        mean = float((similarity.sum() - similarity.diagonal().sum()) / (256 * 255))
        assert abs(mean - shared) < 0.05
