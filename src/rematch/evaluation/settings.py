"""Evaluation input limits: the image resolution and text length a model sees while it is evaluated.

Why this exists: a model's own limits (``ModelConfig.min_pixels``, ``max_pixels``,
``max_text_tokens``) are training choices, picked to fit memory and batch size (448 x 448
and 512 tokens by default). The published MMEB-V1 numbers of Qwen2-VL models were
computed at about 1M pixels per image and with no text truncation, so scoring at the
training limits makes our numbers incomparable. Evaluation therefore chooses its own
limits, applies them for the duration of the evaluation and puts the model back as it
was afterwards (:func:`input_limits`).

What is changed, and why only that: every input is built by the backbone adapter from
``model.adapter.config`` (image loading and resizing, the token estimate used for
batching, text truncation, the packed matching sequence of the reranker) and by the
processor's image processor (its ``size`` bounds). :func:`input_limits` swaps in a copy
of that config with the new limits and sets the image processor's size to match.
``model.config`` is left alone on purpose: it is the model's identity, and its
fingerprint (stored in indexes and embedding caches) must not change with an evaluation
setting. The embedding cache keys its rows by :func:`encoding_settings` instead, so a
vector computed at 448 x 448 is never served to a run at 1M pixels.

The official values (:data:`OFFICIAL_MMEB_V1_QWEN2VL`) come from the VLM2Vec evaluation
harness (TIGER-AI-Lab/VLM2Vec, ``src/arguments.py``): the Qwen2-VL processor resizes each
image itself (``resize_use_processor``) between ``resize_min_pixels = 28*28*4`` and
``resize_max_pixels = 28*28*1280`` pixels, and ``max_len`` is unset, i.e. no truncation.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

#: Qwen-VL images are cut into 14 px patches merged 2 x 2: a side is a multiple of 28 px.
_PATCH_AREA = 28 * 28

#: The presets ``rematch eval mmeb --input-limits`` accepts.
PRESETS = ("official", "model")


class InputLimitsError(ValueError):
    """Input limits that cannot be used; the message names the offending value."""


@dataclass(frozen=True)
class InputLimits:
    """Image area bounds (pixels) and the text-token limit (0 = no truncation) for encoding."""

    min_pixels: int
    max_pixels: int
    max_text_tokens: int
    preset: str = "custom"
    """Where the values came from: "official", "model" (the model's own training limits),
    or "custom"; a preset with some values overridden keeps its name, and
    :meth:`matches_official` says whether the numbers are the official ones."""

    def validate(self) -> "InputLimits":
        for name in ("min_pixels", "max_pixels", "max_text_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputLimitsError(f"{name} must be an integer, got {value!r}")
        if self.min_pixels < 1:
            raise InputLimitsError(f"min_pixels must be >= 1, got {self.min_pixels}")
        if self.max_pixels < _PATCH_AREA:
            raise InputLimitsError(f"max_pixels must be >= {_PATCH_AREA} (one 28 x 28 patch), got {self.max_pixels}")
        if self.min_pixels > self.max_pixels:
            raise InputLimitsError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        if self.max_text_tokens < 0:
            raise InputLimitsError(f"max_text_tokens must be >= 0 (0 = no truncation), got {self.max_text_tokens}")
        return self

    def matches_official(self) -> bool:
        official = OFFICIAL_MMEB_V1_QWEN2VL
        return (self.min_pixels, self.max_pixels, self.max_text_tokens) == (
            official.min_pixels, official.max_pixels, official.max_text_tokens)

    def as_dict(self) -> dict:
        """The JSON record written to summary.json and every <Subset>.json."""
        return {"preset": self.preset, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                "max_text_tokens": self.max_text_tokens, "matches_official": self.matches_official()}


#: The official MMEB-V1 evaluation settings for Qwen2-VL models (see the module docstring).
OFFICIAL_MMEB_V1_QWEN2VL = InputLimits(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 1280, max_text_tokens=0,
                                       preset="official")


def _adapter(model):
    """The backbone adapter whose config shapes every input (an error for anything else)."""
    adapter = getattr(model, "adapter", None)
    if adapter is None or not hasattr(adapter, "config"):
        raise TypeError(f"{type(model).__name__} has no backbone adapter with a config, so evaluation input "
                        "limits cannot be applied to it (pass a ReMatchModel)")
    return adapter


def current_limits(model) -> InputLimits | None:
    """The limits ``model`` encodes with right now (None for an encoder without an adapter)."""
    adapter = getattr(model, "adapter", None)
    config = getattr(adapter, "config", None)
    if config is None:
        return None
    return InputLimits(int(config.min_pixels), int(config.max_pixels), int(config.max_text_tokens), preset="model")


def encoding_settings(model) -> str:
    """The part of an embedding's identity that comes from evaluation settings, not the model.

    Part of the embedding cache's row key; empty for an encoder without an adapter (then
    nothing but the model's fingerprint can change its vectors).
    """
    limits = current_limits(model)
    if limits is None:
        return ""
    return f"min_pixels={limits.min_pixels};max_pixels={limits.max_pixels};max_text_tokens={limits.max_text_tokens}"


def _given(**values: int | None) -> dict[str, object]:
    """The values actually given (None means "keep the preset's")."""
    return {name: value for name, value in values.items() if value is not None}


def resolve_limits(preset: str, model=None, *, min_pixels: int | None = None, max_pixels: int | None = None,
                   max_text_tokens: int | None = None) -> InputLimits:
    """A preset ("official" or "model", the latter read from ``model``) with any given value overridden."""
    if preset == "official":
        base = OFFICIAL_MMEB_V1_QWEN2VL
    elif preset == "model":
        if model is None:
            raise InputLimitsError("input limits preset 'model' needs the model to read its limits from")
        base = current_limits(model)
        if base is None:
            _adapter(model)  # raises the explanatory TypeError
    else:
        raise InputLimitsError(f"unknown input limits preset {preset!r}; choose one of {PRESETS}")
    overrides = _given(min_pixels=min_pixels, max_pixels=max_pixels, max_text_tokens=max_text_tokens)
    return dataclasses.replace(base, **overrides).validate()


@contextmanager
def input_limits(model, limits: InputLimits | None = None, *, min_pixels: int | None = None,
                 max_pixels: int | None = None, max_text_tokens: int | None = None) -> Iterator[InputLimits]:
    """Encode with other image/text limits inside the ``with`` block; restore the model's own after.

    ``limits`` gives all three values (default: the current ones); the keyword arguments
    override single values. Restores the adapter's config and the image processor's size
    even when the block raises. Not thread-safe against encoding running elsewhere in the
    meantime: use it around a whole evaluation, not while another thread encodes.
    """
    adapter = _adapter(model)
    base = limits if limits is not None else current_limits(model)
    overrides = _given(min_pixels=min_pixels, max_pixels=max_pixels, max_text_tokens=max_text_tokens)
    if overrides and limits is None:
        overrides["preset"] = "custom"
    wanted = dataclasses.replace(base, **overrides).validate()
    saved_config = adapter.config
    image_processor = getattr(getattr(adapter, "processor", None), "image_processor", None)
    has_size = image_processor is not None and hasattr(image_processor, "size")
    saved_size = image_processor.size if has_size else None
    adapter.config = dataclasses.replace(saved_config, min_pixels=wanted.min_pixels, max_pixels=wanted.max_pixels,
                                         max_text_tokens=wanted.max_text_tokens)
    try:
        if has_size:
            image_processor.size = {"shortest_edge": wanted.min_pixels, "longest_edge": wanted.max_pixels}
        yield wanted
    finally:
        adapter.config = saved_config
        if has_size:
            image_processor.size = saved_size
