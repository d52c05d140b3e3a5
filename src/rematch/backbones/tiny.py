"""Randomly initialised Qwen2-VL / Qwen2.5-VL / Qwen3-VL backbones of chosen sizes, built offline.

The tiny sizes exist so the tests, the demo and a laptop can exercise the exact code
path a real checkpoint takes (the real transformers classes, save_pretrained and
from_pretrained) without downloading anything. The real sizes ("2b", "3b", "7b") give the
published architectures' shapes with random weights, for benchmarks on a GPU (Qwen3-VL:
"2b", "4b", "8b", its own shapes, :data:`QWEN3_VL_SHAPES`).
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
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from rematch.backbones.offline_tokenizer import build_offline_tokenizer
from rematch.backbones.processor import ImageOnlyQwenVLProcessor

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: Side in pixels of one merged visual token (patch x spatial merge): image sides are multiples of it.
MERGED_PATCH_SIDE = {"qwen2_vl": 28, "qwen2_5_vl": 28, "qwen3_vl": 32}
MODEL_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
                 "qwen3_vl": Qwen3VLForConditionalGeneration}


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


#: Qwen3-VL's published shapes (random weights) and the vision layers whose outputs DeepStack
#: adds to the language model's first layers. The small presets (tiny, small, base) are shared.
QWEN3_VL_SHAPES: dict[str, tuple[BackboneShape, tuple[int, ...]]] = {
    "2b": (BackboneShape(2048, 28, 16, 8, 6144, 1024, 24, 16, 4096, vocab=151936), (5, 11, 17)),
    "4b": (BackboneShape(2560, 36, 32, 8, 9728, 1024, 24, 16, 4096, vocab=151936), (5, 11, 17)),
    "8b": (BackboneShape(4096, 36, 32, 8, 12288, 1152, 27, 16, 4304, vocab=151936, tie_embeddings=False),
           (8, 16, 24)),
}
QWEN3_VL_SMALL_SIZES = ("tiny", "small", "base")


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) in Qwen's 1:1.5:1.5 ratio."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def interleaved_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's split of head_dim/2 frequencies: height and width take every third frequency
    (interleaved, not in blocks), 20 of 64 each in the published [24, 20, 20]; time the rest."""
    half = head_dim // 2
    spatial = (half * 5) // 16
    return [half - 2 * spatial, spatial, spatial]


def _qwen3_shape(size: str) -> tuple[BackboneShape, tuple[int, ...]]:
    if size in QWEN3_VL_SHAPES:
        return QWEN3_VL_SHAPES[size]
    if size not in QWEN3_VL_SMALL_SIZES:
        raise ValueError(f"unknown qwen3_vl size {size!r}; choose one of "
                         f"{sorted(QWEN3_VL_SMALL_SIZES + tuple(QWEN3_VL_SHAPES))}")
    shape = SHAPES[size]
    return shape, tuple(range(min(3, shape.vision_depth)))  # DeepStack from the first (up to 3) vision layers


def _qwen3_vl_config(size: str, special_ids: dict[str, int], vocab_size: int) -> Qwen3VLConfig:
    """A Qwen3VLConfig: Qwen3 text model (explicit head_dim, interleaved M-RoPE), 16 px patches, DeepStack."""
    shape, deepstack = _qwen3_shape(size)
    published = size in QWEN3_VL_SHAPES
    head_dim = 128 if published else shape.hidden // shape.heads
    text = dict(
        vocab_size=shape.vocab or ((vocab_size + 63) // 64) * 64, hidden_size=shape.hidden,
        intermediate_size=shape.intermediate, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=head_dim, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "mrope_section": interleaved_mrope_section(head_dim),
                         "mrope_interleaved": True, "rope_theta": 5e6},
        bos_token_id=special_ids["<|endoftext|>"], eos_token_id=special_ids["<|im_end|>"],
        pad_token_id=special_ids["<|endoftext|>"], tie_word_embeddings=shape.tie_embeddings,
    )
    vision = dict(depth=shape.vision_depth, hidden_size=shape.vision_dim, intermediate_size=shape.vision_intermediate,
                  num_heads=shape.vision_heads, out_hidden_size=shape.hidden, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, deepstack_visual_indexes=list(deepstack),
                  # a 48 x 48 learned position grid in the published models; 16 x 16 keeps tiny ones tiny
                  num_position_embeddings=2304 if published else 256)
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=special_ids["<|image_pad|>"],
                         video_token_id=special_ids["<|video_pad|>"],
                         vision_start_token_id=special_ids["<|vision_start|>"],
                         vision_end_token_id=special_ids["<|vision_end|>"], tie_word_embeddings=shape.tie_embeddings)


def tiny_config(family: str, size: str, special_ids: dict[str, int], vocab_size: int):
    """A Qwen2VLConfig / Qwen2_5_VLConfig / Qwen3VLConfig for the named size preset."""
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; choose one of {FAMILIES}")
    if family == "qwen3_vl":
        return _qwen3_vl_config(size, special_ids, vocab_size)
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
    model_class = MODEL_CLASSES[family]
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = model_class(config)
    model = model.to(dtype).eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=448 * 448, **IMAGE_PROCESSING[family])
    processor = ImageOnlyQwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


#: Image processor settings that differ from Qwen2-VL's: Qwen3-VL cuts 16 px patches (sides
#: multiples of 32 after the 2 x 2 merge) and normalises with mean = std = 0.5, as its
#: published ``preprocessor_config.json`` says.
IMAGE_PROCESSING: dict[str, dict] = {
    "qwen2_vl": {}, "qwen2_5_vl": {},
    "qwen3_vl": {"patch_size": 16, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
