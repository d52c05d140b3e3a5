"""Every ablation row of the demo trains under 2 processes exactly as under 1 with the global batch.

Goes through the real ``train()`` loop (accelerate, DDP over gloo, the plain step and
GradCache), which is what a DDP reducer error ("Expected to have finished reduction in the
prior iteration": a trainable parameter without a gradient) shows up in: it fires at the
second step. Two processes x 2 rows per step, 3 steps, are compared with one process x 4
rows: the logged terms and gradient norms of every step, and the final trainable weights.
One spawn runs all ten two-process trainings; one more runs the five single-process
references (GradCache is exact, so one plain reference serves both modes).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.support.ports import free_port
from rematch.config import apply_overrides
from rematch.world.tasks import write_shapes_dataset
from rematch.demo.pipeline import row_config
from rematch.demo.settings import BACKBONES, ROWS, DemoSettings

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # torchrun, two gloo processes

PER_RANK = 2
WORLD = 2
STEPS = 3
MODES = {"plain": 0, "gradcache": 1}  # train.grad_cache_chunk: 1 cuts each rank's 2 rows into 2 chunks
ROWS_BY_NAME = {row.name: row for row in ROWS}


def _config(data_root: str, out: Path, row_name: str, batch_size: int, chunk: int, backbone: str):
    """The demo's own config for the row on either start (the pretrained tiny Qwen2-VL with its tower
    frozen at 112 px, or the random one fully fine-tuned at 56 px), made small."""
    settings = DemoSettings.create(out=out.parent, quick=True, backbone=backbone)
    config = row_config(settings, ROWS_BY_NAME[row_name], seed=0, data_root=Path(data_root), out=out)
    # matching_samples counts per process (the demo uses a quarter of the per-process batch), so
    # only "every row" matches the same samples under 1 and 2 processes.
    return apply_overrides(config, {"train.steps": STEPS, "train.batch_size": batch_size, "train.plot": False,
                                    "train.grad_cache_chunk": chunk, "loss.matching_samples": 0})


def _train_quietly(config) -> None:
    from rematch.training.loop import train

    train(config, show_progress=False, log=lambda *_: None)


def _two_process_worker(rank: int, port: int, data_root: str, out_root: str, backbone: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    # accelerate finds this group and uses it; the timeout turns a desynchronised rank into an error.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        for row in ROWS:
            for mode, chunk in MODES.items():
                _train_quietly(_config(data_root, Path(out_root) / f"{row.name}-{mode}", row.name, PER_RANK, chunk,
                                       backbone))
    finally:
        dist.destroy_process_group()


def _reference_worker(index: int, data_root: str, out_root: str, backbone: str) -> None:
    """One process, no process group: rows index, index+2, ... with the global batch."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    for row in ROWS[index::2]:
        _train_quietly(_config(data_root, Path(out_root) / f"{row.name}-one", row.name, PER_RANK * WORLD, 0, backbone))


@pytest.fixture(scope="module", params=BACKBONES)
def runs(tmp_path_factory, request) -> Path:
    """Every row trained by two processes and by one, from the backbone the demo starts from."""
    root = tmp_path_factory.mktemp(f"ablation-{request.param}")
    data_root = str(write_shapes_dataset(root / "shapes", train_rows=40, eval_queries=0, seed=0, image_size=56))
    mp.spawn(_two_process_worker, args=(free_port(), data_root, str(root), request.param), nprocs=WORLD, join=True)
    mp.spawn(_reference_worker, args=(data_root, str(root), request.param), nprocs=2, join=True)
    return root


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("row_name", list(ROWS_BY_NAME))
def test_two_processes_train_every_ablation_row_like_one(runs, row_name, mode):
    two, one = runs / f"{row_name}-{mode}", runs / f"{row_name}-one"
    logged_two, logged_one = _log(two), _log(one)
    assert [r["step"] for r in logged_two] == [r["step"] for r in logged_one] == list(range(1, STEPS + 1))
    row = ROWS_BY_NAME[row_name]
    expected_terms = {"contrastive", "loss"} | ({"matching"} if row.uses_matching else set()) | (
        {"orthogonality"} if row.overrides["loss.orthogonality"] else set())
    for a, b in zip(logged_two, logged_one):
        assert expected_terms <= set(b), b
        # Step 1 starts from the same weights: the terms and the gradient norm agree to float noise.
        # Later steps: Adam moves an element by about lr whatever its gradient's size, so float
        # noise in a near-zero gradient element can flip its step; that drift is allowed, a bit.
        rel = 2e-5 if a["step"] == 1 else 5e-4
        for term in sorted(set(b) - {"step", "lr", "samples_per_s"}):  # every logged term, on the global batch
            if term.startswith("matching_accuracy/"):
                # a share of Yes/No decisions: a pair at p(Yes) = p(No) may flip on that float noise,
                # one of a kind's 8 pairs (4 samples x 2) at the most
                assert a[term] == pytest.approx(b[term], abs=1 / 8 + 1e-9), (a["step"], term)
            else:
                assert a[term] == pytest.approx(b[term], rel=rel), (a["step"], term)

    final = f"checkpoints/step-{STEPS:08d}/trainable.safetensors"
    weights_two, weights_one = load_file(str(two / final)), load_file(str(one / final))
    assert set(weights_two) == set(weights_one)
    # Parameters no enabled loss reaches are not trained at all (and not in the checkpoint); the
    # projector's running centre is a buffer, in every checkpoint (it stays zero without matching).
    assert any(name.startswith(("model.projector.mlp.", "model.projector.output_norm"))
               for name in weights_one) == row.uses_matching
    assert ("model.query_tokens" in weights_one) == (row.overrides["model.num_tokens"] > 0)
    differences = torch.cat([(weights_two[n] - weights_one[n]).abs().flatten() for n in weights_one])
    adam_bound = 2 * STEPS * DemoSettings.create(quick=True).lr  # the most a flipped Adam step can move one
    assert float(differences.max()) < adam_bound
    # Those flips touch a few dozen of ~1.1M elements; a wrong gradient would move many more.
    assert float((differences > 1e-5).float().mean()) < 2e-4
