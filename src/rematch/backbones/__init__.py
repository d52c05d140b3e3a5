"""Backbone families: loading checkpoints and choosing the adapter that speaks their format."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from rematch.backbones.attention import load_time_attention
from rematch.backbones.base import BackboneAdapter, EncoderBatch
from rematch.backbones.pretrained_tiny import PRETRAINED_TINY, asset_dir, verify_checksums
from rematch.backbones.processor import ImageOnlyQwenVLProcessor
from rematch.backbones.qwen3_vl import Qwen3VLAdapter
from rematch.backbones.quiet import no_loading_bars
from rematch.backbones.qwen_vl import QwenVLAdapter
from rematch.backbones.tiny import build_tiny_backbone
from rematch.config import ModelConfig

ADAPTERS: dict[str, type[BackboneAdapter]] = {t: adapter for adapter in (QwenVLAdapter, Qwen3VLAdapter)
                                               for t in adapter.model_types}
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointFilesError(ValueError):
    """A checkpoint's config.json and weight files cannot be loaded as one complete model."""


def load_weights(model_class: type[PreTrainedModel], path: str | Path, dtype: torch.dtype, attn_implementation: str,
                 allow_unexpected: bool = True) -> PreTrainedModel:
    """``model_class.from_pretrained(path)``, refusing a model that would not be what the files hold.

    transformers initialises every weight that config.json asks for and the files lack (an
    edited layer count, a config.json from another model) with random values and only logs a
    warning, so every embedding would be silently wrong; a damaged file or a config it cannot
    validate fails deep inside with a message that names neither. Here each is one error naming
    the directory. ``allow_unexpected=False`` also refuses weights the model does not use
    (right for a directory we saved ourselves, where any difference is damage).
    """
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    try:
        with no_loading_bars():  # the "Loading weights 81/81" bar, printed by every command otherwise
            model, info = model_class.from_pretrained(path, dtype=dtype,
                                                      attn_implementation=load_time_attention(attn_implementation),
                                                      ignore_mismatched_sizes=True, output_loading_info=True)
    except StrictDataclassError as error:
        raise CheckpointFilesError(f"{Path(path) / 'config.json'} is not a valid configuration: "
                                   f"{' '.join(str(error).split())}") from error
    except SafetensorError as error:
        raise CheckpointFilesError(f"{path}: cannot read the weight files ({error}); they are damaged or truncated, "
                                   "copy the model again") from error
    kinds = ("missing_keys", "mismatched_keys") + (() if allow_unexpected else ("unexpected_keys",))
    problems = []
    for kind in kinds:
        keys = sorted(str(key if isinstance(key, str) else key[0]) for key in info.get(kind) or ())
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} (e.g. {keys[0]})")
    if problems:
        raise CheckpointFilesError(f"{path}: config.json and the weight files do not match: {'; '.join(problems)}; "
                                   "loading would leave those weights random. Use the config.json saved with the "
                                   "weights (copy the whole directory again)")
    return model.eval()


def adapter_for(model_type: str) -> type[BackboneAdapter]:
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported backbone type {model_type!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type]


def load_pretrained_backbone(name_or_path: str | Path, config: ModelConfig
                             ) -> tuple[PreTrainedModel, ImageOnlyQwenVLProcessor]:
    """Load a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (hub id or local directory) and its processor."""
    hf_config = AutoConfig.from_pretrained(name_or_path)
    model_type = hf_config.model_type
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{name_or_path}: unsupported backbone type {model_type!r}; "
                         f"supported: {sorted(MODEL_CLASSES)}")
    model = load_weights(MODEL_CLASSES[model_type], name_or_path, TORCH_DTYPES[config.dtype],
                         config.attn_implementation)
    processor = ImageOnlyQwenVLProcessor.from_pretrained(name_or_path)
    return model, processor


def load_backbone(config: ModelConfig, device: str | torch.device = "cpu"
                  ) -> tuple[PreTrainedModel, ImageOnlyQwenVLProcessor]:
    """The backbone ``config.backbone`` names: a checkpoint, ``"tiny"`` built offline on ``device``, or
    the shipped ``"tiny-pretrained"`` (:mod:`rematch.backbones.pretrained_tiny`)."""
    if config.backbone == PRETRAINED_TINY:
        directory = asset_dir()
        verify_checksums(directory)
        model, processor = load_pretrained_backbone(directory, config)
        return model.to(device), processor
    if config.backbone == "tiny":
        model, processor = build_tiny_backbone(config.tiny_family, config.tiny_size, config.seed,
                                               dtype=TORCH_DTYPES[config.dtype], device=device)
        model.set_attn_implementation(load_time_attention(config.attn_implementation))
        return model, processor
    model, processor = load_pretrained_backbone(config.backbone, config)
    return model.to(device), processor


__all__ = ["ADAPTERS", "BackboneAdapter", "CheckpointFilesError", "EncoderBatch", "ImageOnlyQwenVLProcessor",
           "Qwen3VLAdapter", "QwenVLAdapter", "adapter_for", "build_tiny_backbone", "load_backbone", "load_pretrained_backbone",
           "load_weights", "TORCH_DTYPES"]
