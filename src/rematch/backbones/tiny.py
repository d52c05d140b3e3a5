"""Randomly initialised Qwen2-VL / Qwen2.5-VL backbones of chosen sizes, built offline.

The tiny sizes exist so the tests, the demo and a laptop can exercise the exact code
path a real checkpoint takes (the real transformers classes, save_pretrained and
from_pretrained) without downloading anything. The real sizes ("2b", "3b", "7b") give the
published architectures' shapes with random weights, for benchmarks on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from rematch.backbones.offline_tokenizer import build_offline_tokenizer
from rematch.backbones.processor import ImageOnlyQwenVLProcessor

FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class BackboneShape:
    """The few numbers that define a Qwen-VL language model and vision tower."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_dim: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    vocab: int | None = None  # None: the offline tokenizer's size, padded to a multiple of 64
    tie_embeddings: bool = True


SHAPES: dict[str, BackboneShape] = {
    # ~1M parameters: seconds per training step on a laptop CPU.
    "tiny": BackboneShape(128, 4, 4, 2, 384, 64, 2, 2, 128),
    # ~6M parameters.
    "small": BackboneShape(256, 6, 8, 4, 768, 128, 4, 4, 256),
    # ~20M parameters.
    "base": BackboneShape(384, 10, 12, 4, 1152, 192, 6, 6, 576),
    # Published shapes (random weights) for GPU benchmarks.
    "2b": BackboneShape(1536, 28, 12, 2, 8960, 1280, 32, 16, 5120, vocab=151936),
    "3b": BackboneShape(2048, 36, 16, 2, 11008, 1280, 32, 16, 3420, vocab=151936),
    "7b": BackboneShape(3584, 28, 28, 4, 18944, 1280, 32, 16, 3420, vocab=152064, tie_embeddings=False),
}


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) in Qwen's 1:1.5:1.5 ratio."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def tiny_config(family: str, size: str, special_ids: dict[str, int], vocab_size: int):
    """A Qwen2VLConfig / Qwen2_5_VLConfig for the named size preset."""
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; choose one of {FAMILIES}")
    if size not in SHAPES:
        raise ValueError(f"unknown tiny size {size!r}; choose one of {sorted(SHAPES)}")
    shape = SHAPES[size]
    vocab = shape.vocab or ((vocab_size + 63) // 64) * 64
    head_dim = shape.hidden // shape.heads
    text = dict(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "mrope_section": mrope_section(head_dim), "rope_theta": 1e6},
        bos_token_id=special_ids["<|endoftext|>"],
        eos_token_id=special_ids["<|im_end|>"],
        pad_token_id=special_ids["<|endoftext|>"],
    )
    common = dict(
        text_config=text,
        image_token_id=special_ids["<|image_pad|>"],
        video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"],
        vision_end_token_id=special_ids["<|vision_end|>"],
        tie_word_embeddings=shape.tie_embeddings,
    )
    if family == "qwen2_vl":
        vision = dict(depth=shape.vision_depth, embed_dim=shape.vision_dim, hidden_size=shape.hidden,
                      num_heads=shape.vision_heads, mlp_ratio=shape.vision_intermediate // shape.vision_dim)
        return Qwen2VLConfig(vision_config=vision, **common)
    vision = dict(depth=shape.vision_depth, hidden_size=shape.vision_dim, out_hidden_size=shape.hidden,
                  intermediate_size=shape.vision_intermediate, num_heads=shape.vision_heads,
                  window_size=112, fullatt_block_indexes=_full_attention_blocks(shape.vision_depth))
    return Qwen2_5_VLConfig(vision_config=vision, **common)


def _full_attention_blocks(depth: int) -> list[int]:
    # Qwen2.5-VL uses full attention in every 8th block (7, 15, 23, 31) and windows elsewhere.
    return [i for i in range(depth) if i % 8 == 7] or [depth - 1]


def build_tiny_backbone(family: str = "qwen2_vl", size: str = "tiny", seed: int = 0,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        ) -> tuple[PreTrainedModel, ImageOnlyQwenVLProcessor]:
    """Build a randomly initialised backbone and its processor, deterministically from ``seed``.

    Weights are created directly on ``device`` (a 3B model is never materialised on the
    CPU first). The caller's global RNG state is left untouched.
    """
    tokenizer = build_offline_tokenizer()
    special_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens
                   + ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>"]}
    config = tiny_config(family, size, special_ids, len(tokenizer))
    model_class = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = model_class(config)
    model = model.to(dtype).eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=448 * 448)
    processor = ImageOnlyQwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
