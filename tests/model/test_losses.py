"""Loss terms against hand computation, and the distributed contrastive gradient."""

from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from tests.support.ports import free_port
from rematch.losses import (OBJECTIVE, LossWeights, ReMatchLoss, info_nce, matching_loss, objective, orthogonality,
                            yes_no_logits)


def unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_info_nce_by_hand():
    queries = unit([[1.0, 0.0], [0.0, 1.0]])
    positives = unit([[1.0, 0.0], [1.0, 1.0]])
    negatives = unit([[0.0, 1.0]])
    tau = 0.5
    loss = info_nce(queries, positives, negatives, temperature=tau)
    s = 1 / math.sqrt(2)
    # query 0: sims [1, s, 0], target 0;  query 1: sims [0, s, 1], target 1
    l0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(s / tau) + 1))
    l1 = -math.log(math.exp(s / tau) / (1 + math.exp(s / tau) + math.exp(1 / tau)))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_orthogonality_by_hand():
    orthonormal = torch.eye(4)[None, :3]  # K = 3 orthogonal states
    assert orthogonality(orthonormal).item() == pytest.approx(0.0, abs=1e-7)
    identical = torch.ones(1, 3, 4)
    assert orthogonality(identical).item() == pytest.approx(1.0, rel=1e-6)
    states = torch.randn(2, 5, 8)
    expected = []
    for item in states:
        e = F.normalize(item, dim=-1)
        k = len(e)
        total = sum((e[i] @ e[j]) ** 2 for i in range(k) for j in range(i + 1, k))
        expected.append(2 / (k * (k - 1)) * total)
    assert orthogonality(states).item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    assert orthogonality(torch.randn(3, 1, 8)).item() == 0.0


def test_matching_loss_is_two_way_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.5, 1.5]])
    labels = torch.tensor([0, 1])
    expected = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.exp(1.5) / (math.exp(0.5) + math.exp(1.5))))
    assert matching_loss(logits, labels).item() == pytest.approx(expected / 2, rel=1e-6)


def test_full_vocabulary_matching_loss_targets_the_yes_and_no_tokens():
    """``full``: -log softmax over the whole vocabulary at the "Yes" (label 0) or "No" (label 1)
    token; the 2-way view of the same logits is their two columns."""
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [0.3, 0.2, 1.5, -0.4]])
    labels = torch.tensor([0, 1])
    yes, no = 1, 3
    expected = -(torch.log_softmax(logits[0], 0)[yes] + torch.log_softmax(logits[1], 0)[no]) / 2
    assert matching_loss(logits, labels, answer_token_ids=(yes, no)).item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(yes_no_logits(logits, (yes, no)), logits[:, [yes, no]])
    two_way = ReMatchLoss(LossWeights(0.0, 0.0, 1.0))(logits, logits, answer_logits=logits[:, [yes, no]],
                                                      answer_labels=labels)["matching"]
    full = ReMatchLoss(LossWeights(0.0, 0.0, 1.0), answer_token_ids=(yes, no))(
        logits, logits, answer_logits=logits, answer_labels=labels)["matching"]
    assert full.item() == pytest.approx(expected.item(), rel=1e-6) and full > two_way


def test_total_is_the_weighted_sum_and_zero_weights_switch_terms_off():
    torch.manual_seed(0)
    q, p, n = (F.normalize(torch.randn(4, 8), dim=-1) for _ in range(3))
    states = torch.randn(12, 4, 8)
    logits, labels = torch.randn(4, 8, 2), torch.randint(0, 2, (4, 8))
    terms = ReMatchLoss(LossWeights(1.0, 0.5, 0.1), temperature=0.02)(q, p, n, states, logits, labels)
    expected = terms["contrastive"] + 0.5 * terms["orthogonality"] + 0.1 * terms["matching"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    baseline = ReMatchLoss(LossWeights(1.0, 0.0, 0.0))(q, p, n, states, logits, labels)
    assert set(baseline) == {"contrastive", "loss"}
    with pytest.raises(ValueError, match="temperature"):
        ReMatchLoss(temperature=0.0)


# ------------------------------------------------------------------ distributed


def _encoder_weight(dim: int = 6) -> torch.Tensor:
    return torch.randn(dim, dim, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ distributed, uneven ranks

# Rows per rank: (queries, hard negatives, matched queries). Every term uses them all:
# MMEB-train has negatives only for some subsets, --skip-bad can drop a row on one rank,
# and a rank's matching plan can be empty. Two processes must equal one process holding
# the global batch (the ranks' rows concatenated in rank order): values and gradient.
UNEVEN = {
    "even ranks": ((4, 4), (4, 4), (4, 4)),
    "negatives 3 and 1": ((4, 4), (3, 1), (2, 2)),
    "negatives 2 and 0, no matching on rank 1": ((4, 4), (2, 0), (4, 0)),
    "a row skipped on rank 1": ((4, 3), (1, 2), (1, 3)),
    "no negatives and no matching anywhere": ((2, 2), (0, 0), (0, 0)),
}
K = 3


def _uneven_inputs(case: str, rank: int | None):
    """The global batch's raw rows and matching labels, or rank ``rank``'s slice of them."""
    queries, negatives, matched = UNEVEN[case]
    generator = torch.Generator().manual_seed(len(case))
    q_raw, p_raw = torch.randn(sum(queries), 6, generator=generator), torch.randn(sum(queries), 6, generator=generator)
    n_raw = torch.randn(sum(negatives), 6, generator=generator)
    labels = torch.randint(0, 2, (sum(matched), 2), generator=generator)
    if rank is None:
        return q_raw, p_raw, n_raw, labels

    def cut(tensor, counts):  # ranks hold consecutive slices, in rank order
        start = sum(counts[:rank])
        return tensor[start:start + counts[rank]]

    return cut(q_raw, queries), cut(p_raw, queries), cut(n_raw, negatives), cut(labels, matched)


def _uneven_loss_and_grad(case: str, rank: int | None):
    """All three terms through a shared linear encoder (what DDP replicates) on a batch or a slice."""
    _, _, matched = UNEVEN[case]
    q_raw, p_raw, n_raw, labels = _uneven_inputs(case, rank)
    weight = _encoder_weight().requires_grad_(True)
    offsets = torch.randn(K, 6, generator=torch.Generator().manual_seed(2))
    answer = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    q, p, n = (F.normalize(t @ weight, dim=-1) for t in (q_raw, p_raw, n_raw))
    states = torch.cat([torch.stack([(t + o) @ weight for o in offsets], dim=1) for t in (q_raw, p_raw, n_raw)])
    if rank is None:  # the global batch: each rank's first matched[r] queries, in rank order
        counts = UNEVEN[case][0]
        rows = [counts[0] * r + i for r in range(2) for i in range(matched[r])]
    else:
        rows = list(range(matched[rank]))
    logits = (q[rows] @ answer).view(len(rows), 2, 2)
    terms = ReMatchLoss(LossWeights(1.0, 0.5, 0.1), temperature=0.1)(
        q, p, n if len(n) else None, states, logits, labels)
    objective(terms).backward()
    return {k: v.item() for k, v in terms.items() if k != OBJECTIVE}, weight.grad


def _uneven_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        results = {}
        for case in UNEVEN:
            terms, grad = _uneven_loss_and_grad(case, rank)
            dist.all_reduce(grad)  # what DDP does after backward: average over ranks
            results[case] = {"terms": terms, "grad": grad / world}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_equal_one_process_with_the_global_batch_even_or_uneven_ranks(tmp_path):
    mp.spawn(_uneven_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for case in UNEVEN:
        terms, grad = _uneven_loss_and_grad(case, None)
        matched = sum(UNEVEN[case][2])
        assert ("matching" in terms) == (matched > 0), case
        for result in ranks:
            got = result[case]
            assert set(got["terms"]) == set(terms), case
            for name, value in terms.items():
                assert got["terms"][name] == pytest.approx(value, rel=1e-5), (case, name)
            torch.testing.assert_close(got["grad"], grad, rtol=1e-5, atol=1e-7, msg=case)
