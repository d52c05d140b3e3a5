"""The model a command embeds with: its spec, its device, and the refusal of untrained heads.

``encode``, ``index build``, ``search`` and ``eval`` produce numbers people trust. A model
whose learnable tokens and projector were never trained (``tiny``, a directory saved by
``rematch tiny``, or fresh parts on a bare backbone) produces numbers that look just as real,
so these commands refuse one unless ``--allow-untrained`` says it is meant (smoke tests,
timing runs). A typo'd or absent ``--device`` is refused here too, before the model loads.
"""

from __future__ import annotations

import argparse

ALLOW_UNTRAINED_HELP = ("use a model whose ReMatch heads are untrained (e.g. tiny): its embeddings are random; "
                        "for smoke tests and timings only")
DEVICE_HELP = "e.g. cuda:1 or cpu (default: cuda when available, else cpu)"


class UntrainedModelError(ValueError):
    """A command that embeds was given a model with freshly initialised ReMatch heads."""


def add_model_loading_flags(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """``--allow-untrained`` (and ``--device`` unless the caller adds its own)."""
    parser.add_argument("--allow-untrained", action="store_true", help=ALLOW_UNTRAINED_HELP)
    if device:
        parser.add_argument("--device", default=None, help=DEVICE_HELP)


def load_model(spec: str, device: str | None = None, allow_untrained: bool = False):
    """``ReMatchModel.load(spec, device)``, refused when its heads were not loaded from a trained model."""
    from rematch import ReMatchModel

    check_device(device)
    model = ReMatchModel.load(spec, device)
    require_trained_heads(model, spec, allow_untrained)
    return model


def check_device(device: str | None) -> None:
    """A ``--device`` this machine has, checked before the model is loaded: torch reports a typo
    (``cuda1``) or a missing GPU with a traceback from deep inside ``.to()``."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device; use e.g. cpu, cuda, cuda:1 or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: this machine has no usable CUDA GPU; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: rematch runs on cpu, cuda or mps, not {parsed.type}")


def require_trained_heads(model, spec: str, allow_untrained: bool) -> None:
    if model.heads_source is None and not allow_untrained:
        raise UntrainedModelError(
            f"model {spec!r} has untrained, randomly initialised ReMatch heads, so its embeddings are "
            "meaningless; give a trained model (a saved directory or hub id), or pass --allow-untrained to use "
            "it anyway")
