"""Which device a model runs on when the caller does not say.

Inference (``encode``, ``index build``, ``search``, ``eval``) used to default to the CPU,
so a GPU machine silently ran 10-100x slower unless ``--device`` was given. One rule now
serves the API and every command: the GPU when there is one, the CPU otherwise, and under
``torchrun`` the GPU of this rank (``cuda:LOCAL_RANK``), so ranks never pile onto GPU 0.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch


def default_device(cuda_available: bool | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``"cuda"`` (``"cuda:LOCAL_RANK"`` under torchrun) when CUDA is available, else ``"cpu"``.

    ``cuda_available`` and ``environ`` default to the real ones (``torch.cuda.is_available()``,
    ``os.environ``); passing them makes the choice testable without a GPU.
    """
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not available:
        return "cpu"
    env = os.environ if environ is None else environ
    local_rank = env.get("LOCAL_RANK")
    if local_rank is None or local_rank == "":
        return "cuda"
    try:
        rank = int(local_rank)
    except ValueError:
        raise ValueError(f"LOCAL_RANK={local_rank!r} is not an integer (it is set by torchrun)") from None
    if rank < 0:
        raise ValueError(f"LOCAL_RANK={local_rank!r} must be >= 0")
    return f"cuda:{rank}"


def resolve_device(device: str | torch.device | None) -> str | torch.device:
    """``device`` itself when given, else :func:`default_device`."""
    return default_device() if device is None else device
