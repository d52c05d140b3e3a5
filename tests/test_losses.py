"""Loss terms against hand computation, and the distributed contrastive gradient."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from rematch.losses import LossWeights, ReMatchLoss, info_nce, matching_loss, objective, orthogonality


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data(batch: int, dim: int = 6):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, dim, generator=generator) for _ in range(3)]


def _encoder_weight(dim: int = 6) -> torch.Tensor:
    return torch.randn(dim, dim, generator=torch.Generator().manual_seed(1))


def _loss_and_grad(q_raw, p_raw, n_raw):
    """A shared linear encoder (what DDP replicates) embeds this process's slice."""
    weight = _encoder_weight().requires_grad_(True)
    q, p, n = (F.normalize(t @ weight, dim=-1) for t in (q_raw, p_raw, n_raw))
    terms = ReMatchLoss(LossWeights(1.0, 0.0, 0.0), temperature=0.1)(q, p, n)
    objective(terms).backward()
    return terms["contrastive"].item(), weight.grad


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        full = _data(4 * world)
        loss, grad = _loss_and_grad(*[t[rank * 4:(rank + 1) * 4] for t in full])
        dist.all_reduce(grad)  # what DDP does after backward: average over ranks
        grad /= world
        torch.save({"loss": loss, "grad": grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    single_loss, single_grad = _loss_and_grad(*_data(4 * world))
    for rank in range(world):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["loss"] == pytest.approx(single_loss, rel=1e-6)
        torch.testing.assert_close(result["grad"], single_grad, rtol=1e-5, atol=1e-7)
