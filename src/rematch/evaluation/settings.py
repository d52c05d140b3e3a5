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


def model_config_of(model):
    """The model's ModelConfig, which decides how documents are prepared (an error if absent)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "document_instructions"):
        raise TypeError(f"{type(model).__name__} has no `config` (a ModelConfig): evaluation reads the model's "
                        "document-instruction settings from it, so a wrapper must expose its model's config")
    return config


def limits_preset(model, effective: InputLimits) -> str:
    """The preset name of the limits in force: "model" if they are the model's configured ones, else "custom"."""
    config = getattr(model, "config", None)
    if config is None:
        return "model"
    own = (getattr(config, "min_pixels", None), getattr(config, "max_pixels", None),
           getattr(config, "max_text_tokens", None))
    return "model" if own == (effective.min_pixels, effective.max_pixels, effective.max_text_tokens) else "custom"


# ---------------------------------------------------------------------- video frames (MMEB-V2)

#: Frames per video of the official MMEB-V2 harness (``num_frames: 8`` in its
#: ``experiments/public/eval/video.yaml``), taken by its own index rule
#: (:func:`rematch.data.video.mmeb_v2_indices`).
OFFICIAL_MMEB_V2_VIDEO_FRAMES = 8


def video_sampling_record(model) -> dict | None:
    """How videos are sampled right now, as recorded in every MMEB-V2 result (None without an adapter).

    ``rule`` is "mmeb_v2" (the harness's ``np.linspace(0, n - 1, frames, dtype=int)`` over the
    saved frames, all of them when fewer; a file is first cut to the 64 frames the harness
    saves) or "fps" (the model's own: ``fps`` frames per second, at most ``frames``);
    ``matches_official`` says whether it is the harness's rule with 8 frames.
    """
    config = getattr(getattr(model, "adapter", None), "config", None)
    if config is None:
        return None
    rule = config.video_sampling
    record = {"rule": rule, "frames": int(config.video_max_frames)}
    if rule == "fps":
        record["fps"] = float(config.video_fps)
    record["matches_official"] = rule == "mmeb_v2" and record["frames"] == OFFICIAL_MMEB_V2_VIDEO_FRAMES
    return record


@contextmanager
def video_sampling(model, frames: int | None = OFFICIAL_MMEB_V2_VIDEO_FRAMES) -> Iterator[dict | None]:
    """Take ``frames`` frames per video by the MMEB-V2 harness's rule inside the ``with`` block.

    Why a swap and not a model setting: how many frames evaluation shows the model is an
    evaluation choice (the harness uses 8; a model may have trained on 16 at 1 fps), like the
    input limits. The adapter gets a copy of its config with ``video_sampling="mmeb_v2"`` and
    ``video_max_frames=frames``; ``model.config`` and the fingerprint stay as they are, and the
    embedding cache keys video items by these settings (``rematch.encoding.cache.video_settings``).
    ``frames=None`` keeps the model's own sampling. Restored on exit, even after an error.
    Yields :func:`video_sampling_record`.
    """
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise InputLimitsError(f"video frames must be an integer >= 1 (or None: the model's own sampling), "
                               f"got {frames!r}")
    adapter = getattr(model, "adapter", None)
    if frames is None or getattr(adapter, "config", None) is None:  # nothing to switch (an encoder of its own)
        yield video_sampling_record(model)
        return
    saved = adapter.config
    adapter.config = dataclasses.replace(saved, video_sampling="mmeb_v2", video_max_frames=frames)
    try:
        yield video_sampling_record(model)
    finally:
        adapter.config = saved


# ---------------------------------------------------------------------- target prompt style

@contextmanager
def with_target_prompt_style(model, style: str | None = None) -> Iterator[str | None]:
    """Encode documents with another target prompt style inside the ``with`` block (None: the model's own).

    The style decides the document side's text (rematch.instructions), so it is part of the
    model's identity: inside the block ``model.config`` is a copy with the style set, and the
    fingerprint (hence the embedding cache file and every result's ``model_fingerprint``) is
    that of the model encoding this way. Restored on exit, even after an error.
    """
    from rematch.config import TARGET_PROMPT_STYLES

    config = model_config_of(model)
    if style is None or style == getattr(config, "target_prompt_style", None):
        yield getattr(config, "target_prompt_style", None)
        return
    if style not in TARGET_PROMPT_STYLES:
        raise InputLimitsError(f"target prompt style must be one of {', '.join(TARGET_PROMPT_STYLES)}, got {style!r}")
    model.config = dataclasses.replace(config, target_prompt_style=style)
    try:
        yield style
    finally:
        model.config = config
