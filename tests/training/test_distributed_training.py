"""Two processes x batch B == one process x batch 2B: losses, gradients and trained weights (CPU, gloo)."""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from tests.support.ports import free_port
from tests.support.processes import run_with_deadline
from rematch import ReMatchModel
from rematch.config import LossConfig, load_config
from rematch.training.collate import TrainCollator
from rematch.data.items import Item
from rematch.data.mmeb import open_train_source
from rematch.data.records import TrainExample
from rematch.world.tasks import write_shapes_dataset
from rematch.losses import OBJECTIVE, objective
from rematch.training.gradcache import GradCache, average_gradients_across_processes
from rematch.training.loop import train
from rematch.training.step import ReMatchTrainingModule

pytestmark = pytest.mark.distributed  # torchrun, two gloo processes

B = 4


def _module(family: str = "qwen2_vl") -> ReMatchTrainingModule:
    model = ReMatchModel.tiny(backbone=family, num_tokens=4, seed=0, max_pixels=56 * 56)
    return ReMatchTrainingModule(model, LossConfig(matching=0.1, matching_samples=0), seed=0)


def _examples(root: str, count: int):
    return open_train_source(root, seed=0).take(count)


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, port: int, root: str, out: str, use_gradcache: bool, family: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        module = _module(family)
        batch = TrainCollator(module.model)(_examples(root, B * world)[rank * B:(rank + 1) * B])
        if use_gradcache:
            terms = GradCache(module, chunk_size=3).step(batch)
        else:
            terms = module(batch)
            objective(terms).backward()
            average_gradients_across_processes(module)  # what DDP does after backward
        torch.save({"terms": {k: v.item() for k, v in terms.items()}, "grads": _grads(module)},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture
def one_thread():
    """One torch thread in this process while two workers share the CPU; put back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return str(write_shapes_dataset(tmp_path_factory.mktemp("shapes"), train_rows=40, eval_queries=0, seed=1,
                                    image_size=56))


@pytest.mark.parametrize("use_gradcache,family", [(False, "qwen2_vl"), (True, "qwen2_vl"), (True, "qwen3_vl")],
                         ids=["plain", "gradcache", "gradcache-qwen3vl"])
def test_two_processes_give_the_single_process_loss_and_gradients(tmp_path, shapes_root, use_gradcache, family,
                                                                  one_thread):
    single = _module(family)
    batch = TrainCollator(single.model)(_examples(shapes_root, 2 * B))
    terms = single(batch)
    objective(terms).backward()
    expected = _grads(single)

    mp.spawn(_worker, args=(2, free_port(), shapes_root, str(tmp_path), use_gradcache, family), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in ranks:
        assert result["terms"]["contrastive"] == pytest.approx(terms["contrastive"].item(), rel=1e-5)
    for term in ("orthogonality", "matching"):  # local means; their average is the global mean
        mean = sum(r["terms"][term] for r in ranks) / 2
        assert mean == pytest.approx(terms[term].item(), rel=1e-4), term
    # each gradient relative to its own size, but a gradient that cancels out to ~1e-7 of the largest
    # one (the projector's output norm: 1.8e-7 against 8.0) is compared with that floor instead: the
    # order the rows are summed in moves it by 0.2%, two ranks or one
    floor = 1e-5 * max(float(g.abs().max()) for g in expected.values())
    for result in ranks:
        assert set(result["grads"]) == set(expected)
        worst = max(float((result["grads"][n] - expected[n]).abs().max() / max(float(expected[n].abs().max()), floor))
                    for n in expected)
        assert worst < 1e-4


def test_torchrun_two_processes_train_the_same_weights_as_one(tmp_path):
    overrides = ["--steps", "2", "--train.warmup_ratio", "0", "--data.builtin_train_rows", "40",
                 "--model.num_tokens", "4", "--loss.matching_samples", "0", "--model.max_pixels", "3136",
                 "--train.save_every", "0", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = tmp_path / "two"
    completed = run_with_deadline([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                   "--master_port", str(free_port()), "-m", "rematch.cli", "train",
                                   "--config", "configs/demo-tiny.yaml", "--out", str(two),
                                   "--train.batch_size", str(B), *overrides], env=env, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("trained 2 steps") == 1  # only the main process reports
    one = tmp_path / "one"
    flat = dict(zip(overrides[0:-1:2], overrides[1::2]))
    config = load_config("configs/demo-tiny.yaml", [f"train.out={one}", f"train.batch_size={2 * B}"]
                         + [f"{k.lstrip('-').replace('steps', 'train.steps')}={v}" for k, v in flat.items()])
    train(config, show_progress=False, log=lambda *_: None)
    logged = [[json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()] for run in (two, one)]
    for a, b in zip(*logged):
        assert a["contrastive"] == pytest.approx(b["contrastive"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    final = "checkpoints/step-00000002/trainable.safetensors"
    a, b = load_file(str(two / final)), load_file(str(one / final))
    for name in a:
        # Adam moves an element by up to lr (1.5e-4 here) whatever its gradient's size, so float
        # noise in a near-zero gradient can show as a few 1e-5 in the weights.
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4, msg=name)


# ------------------------------------------------------------------ uneven ranks under DDP


def _uneven_module() -> ReMatchTrainingModule:
    """Full fine-tuning (the vision tower trains); rows without a hard negative are not matched."""
    model = ReMatchModel.tiny(num_tokens=4, seed=0, max_pixels=56 * 56)
    return ReMatchTrainingModule(model, LossConfig(matching=0.1, matching_samples=0, in_batch_negatives=False), seed=0)


def _uneven_examples(root: str) -> list[list[TrainExample]]:
    """Rank 0: three shapes rows (images, one hard negative each). Rank 1: two text-only rows
    without negatives, so its batch reaches neither the vision tower nor the matching branch."""
    text_only = [TrainExample(Item(text="a large red circle"), Item(text="red circle, large")),
                 TrainExample(Item(text="a small blue star"), Item(text="blue star, small"))]
    return [_examples(root, 3), text_only]


def _uneven_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        results = {}
        for mode in ("ddp", "gradcache"):
            module = _uneven_module()
            batch = TrainCollator(module.model)(_uneven_examples(root)[rank])
            wrapped = DistributedDataParallel(module) if mode == "ddp" else None
            for step in range(2):  # a parameter without a gradient makes DDP fail at the second forward
                module.zero_grad(set_to_none=True)
                if wrapped is not None:
                    terms = wrapped(batch, step)
                    objective(terms).backward()
                else:
                    terms = GradCache(module, chunk_size=2).step(batch, step)
            results[mode] = {"terms": {k: v.item() for k, v in terms.items() if k != OBJECTIVE},
                             "grads": _grads(module)}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_with_uneven_rows_negatives_images_and_matching_equal_one_process(tmp_path, shapes_root, one_thread):
    single = _uneven_module()
    batch = TrainCollator(single.model)([e for rank in _uneven_examples(shapes_root) for e in rank])
    assert batch.negatives is not None and len(batch.negatives) == 3
    terms = single(batch, 1)
    objective(terms).backward()
    expected = _grads(single)
    assert {"contrastive", "orthogonality", "matching"} <= set(terms)

    mp.spawn(_uneven_worker, args=(2, free_port(), shapes_root, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in ranks:
        for mode in ("ddp", "gradcache"):
            got = result[mode]
            for name, value in terms.items():  # every term is the global batch's value, on every rank
                assert got["terms"][name] == pytest.approx(value.item(), rel=1e-5), (mode, name)
            assert set(got["grads"]) == set(expected), mode
            worst = max(float((got["grads"][n] - expected[n]).abs().max() / expected[n].abs().max().clamp_min(1e-12))
                        for n in expected)
            assert worst < 1e-4, mode
