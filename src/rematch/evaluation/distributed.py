"""Evaluation across processes: each rank encodes a strided shard, the shards are gathered.

Works with whatever ``torch.distributed`` process group the caller started (torchrun +
NCCL on GPUs, gloo on CPUs); without one everything runs in the current process. Only
the main process (rank 0) writes files. The shard of rank r is items r, r + W, r + 2W...
(strided rather than contiguous, so every rank gets a similar mix of long and short items).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np

from rematch.data.items import Item
from rematch.evaluation.cache import CachedEncoder, EncodeStats


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier()


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (a picklable object), in rank order; ``[value]`` without a group."""
    dist = _dist()
    if not dist:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def init_from_environment() -> str | None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), if not joined yet.

    Returns the device this rank should use (``cuda:LOCAL_RANK`` with NCCL when CUDA is
    available, else None with gloo), or None when not launched by torchrun.
    """
    import torch
    import torch.distributed as dist

    from rematch.devices import default_device

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    device = default_device()  # cuda:LOCAL_RANK, the same rule single-process commands use
    if device != "cpu":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
        return device
    dist.init_process_group("gloo")
    return None


@contextmanager
def torchrun_session() -> Iterator[str | None]:
    """:func:`init_from_environment` for the duration of a command, then leave the group cleanly.

    Yields the device this rank should use (or None). Leaving matters: a rank that exits
    without destroying the group can abort the store the other ranks still talk to.
    """
    import torch.distributed as dist

    started = not (dist.is_available() and dist.is_initialized()) and int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = init_from_environment()
    try:
        yield device
    finally:
        if started and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def encode_across_ranks(encoder: CachedEncoder, items: Sequence[Item], role: str) -> np.ndarray:
    """All of ``items`` embedded, each rank encoding only its strided shard; every rank gets the full array."""
    rank, world = rank_and_world()
    if world == 1:
        return encoder.encode(items, role)
    local = encoder.encode(items[rank::world], role)
    shards = all_gather(local)
    dims = {shard.shape[1] for shard in shards if shard.size}
    if len(dims) > 1:
        raise RuntimeError(f"ranks returned embeddings of different sizes {sorted(dims)}: are all ranks "
                           "running the same model?")
    output = np.zeros((len(items), dims.pop() if dims else 0), dtype=np.float32)
    for shard_rank, shard in enumerate(shards):
        if shard.size:
            output[shard_rank::world] = shard
    return output


def gather_stats(stats: EncodeStats) -> EncodeStats:
    """Encoding totals over all ranks; seconds is the slowest rank's (the ranks run in parallel)."""
    everyone = all_gather(stats)
    return EncodeStats(encoded=sum(s.encoded for s in everyone), cached=sum(s.cached for s in everyone),
                       seconds=max(s.seconds for s in everyone))
