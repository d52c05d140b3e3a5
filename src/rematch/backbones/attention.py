"""Which attention kernel each part of the backbone runs.

Three forwards with different needs share one backbone:

* the vision tower: many images of different sizes packed into one sequence, each image
  (Qwen2.5-VL: each window) attending only to itself. With flash-attention 2 transformers
  runs that as one variable-length kernel call per layer. With sdpa or eager, the
  installed transformers (5.x) splits the sequence and loops over the images/windows in
  Python, with a host sync (``lengths.tolist()``) in every layer: hundreds of small kernel
  launches per layer at 448 px. Nothing in this project patches that loop; on a GPU,
  install ``flash-attn`` and ``attn_implementation="auto"`` (the default) picks it.
* the embedding forward: left-padded rows and a 2-D padding mask; flash-attention 2 runs
  it variable-length (no compute on padding), sdpa on the padded rectangle.
* the packed matching forward (and the padding-free embedding forward without
  flash-attention): a 4-D block mask, which only sdpa and eager take. The text model is
  switched to sdpa for exactly those forwards (:func:`masked_attention`) and back after.

``attn_implementation="auto"`` resolves to flash_attention_2 when the ``flash_attn``
package is importable, the model is on CUDA and its dtype is bf16/fp16; otherwise sdpa.
An explicit value (sdpa, eager, flash_attention_2) is used for both parts as given.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

AUTO = "auto"
FLASH = "flash_attention_2"
MASK_KERNELS = ("sdpa", "eager")
"""Kernels that take an arbitrary 4-D attention mask."""


def flash_attention_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(requested: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The kernel ``requested`` means on this device and dtype (``"auto"`` resolved, see module docstring)."""
    if requested != AUTO:
        return requested
    device = torch.device(device)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and flash_attention_installed():
        return FLASH
    return "sdpa"


def load_time_attention(requested: str) -> str:
    """The kernel to build or load a backbone with, before it reaches its device ("auto" -> sdpa;
    the first forward on the final device switches it, :func:`configure_attention`)."""
    return "sdpa" if requested == AUTO else requested


def _configs(causal_lm: nn.Module):
    config = causal_lm.config
    return config.vision_config, config.text_config


def configure_attention(causal_lm: nn.Module, requested: str) -> str:
    """Give the vision tower and the language model the kernel ``requested`` resolves to here.

    Idempotent and cheap when nothing changes (called before every forward): the model's
    device and dtype are read from its parameters. Returns the kernel in use.
    """
    parameter = next(causal_lm.parameters())
    wanted = resolve_attention(requested, parameter.device, parameter.dtype)
    vision, text = _configs(causal_lm)
    if vision._attn_implementation != wanted or text._attn_implementation != wanted:
        causal_lm.set_attn_implementation({"vision_config": wanted, "text_config": wanted})
    return wanted


def text_attention(causal_lm: nn.Module) -> str:
    return _configs(causal_lm)[1]._attn_implementation


@contextmanager
def masked_attention(causal_lm: nn.Module) -> Iterator[str]:
    """Run the language model with a kernel that takes a 4-D mask for the duration (yields its name).

    Under flash-attention the text config is set to sdpa and restored on exit; the attention
    layers read the kernel from their config at every call, so nothing else changes.
    """
    text = _configs(causal_lm)[1]
    current = text._attn_implementation
    if current in MASK_KERNELS:
        yield current
        return
    text._attn_implementation = "sdpa"
    try:
        yield "sdpa"
    finally:
        text._attn_implementation = current


def mask_for_kernel(block_mask: torch.Tensor, kernel: str, dtype: torch.dtype) -> torch.Tensor:
    """A (R, 1, L, L) boolean mask (True = may attend) in the form ``kernel`` takes: bool for
    sdpa, additive (0 / most negative) for eager."""
    if kernel == "sdpa":
        return block_mask
    if kernel == "eager":
        return torch.zeros(block_mask.shape, dtype=dtype, device=block_mask.device).masked_fill(
            ~block_mask, torch.finfo(dtype).min)
    raise ValueError(f"a 4-D block mask needs attn_implementation sdpa or eager, not {kernel!r}")
