"""Process-group helpers every layer shares: rank, world size, barrier, gather, the torchrun session.

Why at the bottom: training, evaluation, retrieval and encoding all ask "which rank am I,
how many are there, wait for the others"; one module answers, so no layer reaches sideways
or up for it. Works with whatever ``torch.distributed`` group the caller started (torchrun
+ NCCL on GPUs, gloo on CPUs); without one every helper answers as a single process.
torch is imported only when a helper runs, so light commands (``--help``) stay light.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator


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


def all_reduce_sum(tensor):
    """``tensor`` summed over every rank, in place and returned (itself without a group).

    Every rank must call it, with a tensor of the same shape, on its collective device
    (CPU for gloo, the GPU for NCCL)."""
    dist = _dist()
    if dist and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


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


def world_size() -> int:
    """Processes in the current group, 1 without one."""
    return rank_and_world()[1]
