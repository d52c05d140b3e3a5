"""Backbone families: loading checkpoints and choosing the adapter that speaks their format."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from rematch.backbones.base import BackboneAdapter, EncoderBatch
from rematch.backbones.processor import ImageOnlyQwenVLProcessor
from rematch.backbones.qwen_vl import QwenVLAdapter
from rematch.backbones.tiny import build_tiny_backbone
from rematch.config import ModelConfig

ADAPTERS: dict[str, type[BackboneAdapter]] = {t: QwenVLAdapter for t in QwenVLAdapter.model_types}
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def adapter_for(model_type: str) -> type[BackboneAdapter]:
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported backbone type {model_type!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type]


def load_pretrained_backbone(name_or_path: str | Path, config: ModelConfig
                             ) -> tuple[PreTrainedModel, ImageOnlyQwenVLProcessor]:
    """Load a Qwen-VL checkpoint (hub id or local directory) and its processor."""
    hf_config = AutoConfig.from_pretrained(name_or_path)
    model_type = hf_config.model_type
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{name_or_path}: unsupported backbone type {model_type!r}; "
                         f"supported: {sorted(MODEL_CLASSES)}")
    model = MODEL_CLASSES[model_type].from_pretrained(
        name_or_path, dtype=TORCH_DTYPES[config.dtype], attn_implementation=config.attn_implementation)
    processor = ImageOnlyQwenVLProcessor.from_pretrained(name_or_path)
    return model.eval(), processor


def load_backbone(config: ModelConfig, device: str | torch.device = "cpu"
                  ) -> tuple[PreTrainedModel, ImageOnlyQwenVLProcessor]:
    """The backbone ``config.backbone`` names: a checkpoint, or ``"tiny"`` built offline on ``device``."""
    if config.backbone == "tiny":
        model, processor = build_tiny_backbone(config.tiny_family, config.tiny_size, config.seed,
                                               dtype=TORCH_DTYPES[config.dtype], device=device)
        model.set_attn_implementation(config.attn_implementation)
        return model, processor
    model, processor = load_pretrained_backbone(config.backbone, config)
    return model.to(device), processor


__all__ = ["ADAPTERS", "BackboneAdapter", "EncoderBatch", "ImageOnlyQwenVLProcessor", "QwenVLAdapter",
           "adapter_for", "build_tiny_backbone", "load_backbone", "load_pretrained_backbone", "TORCH_DTYPES"]
