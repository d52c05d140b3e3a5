"""The matching head's loss and accuracy per kind of view pair: by hand, and over processes."""

from __future__ import annotations

import os
from collections import Counter
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.support.ports import free_port
from rematch.losses import matching_loss
from rematch.matching import VIEW_KINDS, pair_kinds
from rematch.training.matching_diagnostics import VIEW_METRICS, matching_by_view, split_view_metrics

KINDS = pair_kinds(2)


def test_pair_kinds_follow_the_packed_answer_order():
    assert KINDS == ["raw-raw", "raw-soft", "raw-raw", "raw-soft", "soft-raw", "soft-soft", "soft-raw", "soft-soft"]
    assert pair_kinds(1) == list(VIEW_KINDS)
    assert Counter(KINDS) == {kind: 2 for kind in VIEW_KINDS}


def test_each_kind_is_the_mean_over_its_pairs_and_accuracy_reads_yes_against_no():
    logits = torch.randn(3, 8, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (3 * 8,), generator=torch.Generator().manual_seed(1))
    metrics = matching_by_view(logits, labels, KINDS, None, torch.device("cpu"))
    assert set(metrics) == set(VIEW_METRICS)
    per_pair = matching_loss(logits, labels, reduction="none").view(3, 8)
    correct = (logits.argmax(-1).view(-1) == labels).float().view(3, 8)
    for kind in VIEW_KINDS:
        columns = [c for c, k in enumerate(KINDS) if k == kind]
        assert metrics[f"matching_loss/{kind}"].item() == pytest.approx(per_pair[:, columns].mean().item(), rel=1e-6)
        assert metrics[f"matching_accuracy/{kind}"].item() == pytest.approx(correct[:, columns].mean().item())
    weighted = sum(metrics[f"matching_loss/{kind}"] for kind in VIEW_KINDS) / 4  # 2 pairs of each kind per sample
    assert weighted.item() == pytest.approx(matching_loss(logits, labels).item(), rel=1e-6)
    assert matching_by_view(None, None, KINDS, None, torch.device("cpu")) == {}  # no pair: nothing to log
    losses, logged = split_view_metrics({"loss": torch.tensor(1.0), **metrics})
    assert set(losses) == {"loss"} and list(logged) == list(VIEW_METRICS)


# ------------------------------------------------------------------ two processes, uneven pairs

#: Matched samples per rank: rank 1 has none in the second case (a rank whose plan is empty).
CASES = {"even": (2, 2), "uneven": (3, 1), "one rank": (2, 0)}


def _inputs(case: str, rank: int | None):
    counts = CASES[case]
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(sum(counts), 8, 2, generator=generator)
    labels = torch.randint(0, 2, (sum(counts), 8), generator=generator)
    if rank is None:
        return logits, labels.reshape(-1)
    start = sum(counts[:rank])
    mine = slice(start, start + counts[rank])
    return (logits[mine], labels[mine].reshape(-1)) if counts[rank] else (None, None)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        results = {case: {k: v.item() for k, v in matching_by_view(*_inputs(case, rank), KINDS, None,
                                                                    torch.device("cpu")).items()}
                   for case in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_log_the_global_batchs_means_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for case in CASES:
        expected = matching_by_view(*_inputs(case, None), KINDS, None, torch.device("cpu"))
        for result in ranks:
            assert set(result[case]) == set(expected), case
            for name, value in expected.items():
                assert result[case][name] == pytest.approx(value.item(), rel=1e-6), (case, name)
