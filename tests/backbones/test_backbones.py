"""Tiny offline backbones use the real transformers classes and the real save/load path."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from rematch.backbones import MODEL_CLASSES, ImageOnlyQwenVLProcessor, build_tiny_backbone
from rematch.backbones.offline_tokenizer import build_offline_tokenizer
from rematch.backbones.qwen_vl import mrope_positions
from rematch.backbones.tiny import SHAPES, count_parameters, mrope_section


@pytest.mark.parametrize("size,low,high", [("tiny", 0.7e6, 1.5e6), ("small", 5e6, 7.5e6), ("base", 17e6, 24e6)])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_named_sizes_have_the_promised_parameter_counts(family, size, low, high):
    model, _ = build_tiny_backbone(family, size)
    assert low <= count_parameters(model) <= high
    assert model.config.model_type == family


def test_mrope_sections_sum_to_half_the_head_dim():
    for shape in SHAPES.values():
        head_dim = shape.hidden // shape.heads
        assert sum(mrope_section(head_dim)) == head_dim // 2
    assert mrope_section(128) == [16, 24, 24]  # the published Qwen2-VL split


def test_same_seed_same_weights_and_caller_rng_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, _ = build_tiny_backbone(seed=4)
    assert torch.equal(torch.rand(1), expected_next)
    second, _ = build_tiny_backbone(seed=4)
    other, _ = build_tiny_backbone(seed=5)
    for (name, a), (_, b), (_, c) in zip(first.state_dict().items(), second.state_dict().items(),
                                         other.state_dict().items()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.state_dict().values(), other.state_dict().values()))


def test_offline_tokenizer_is_deterministic_and_qwen_like():
    a, b = build_offline_tokenizer(), build_offline_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    for word in ("Yes", "No"):
        assert len(a(word, add_special_tokens=False)["input_ids"]) == 1
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert len(a(token, add_special_tokens=False)["input_ids"]) == 1
    text = "What colour is the star? 42 <|im_end|>"
    assert a.decode(a(text)["input_ids"]) == text


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_tiny_backbone_round_trips_through_from_pretrained(tmp_path, family, shape_images):
    model, processor = build_tiny_backbone(family, "tiny", seed=1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    reloaded = MODEL_CLASSES[config.model_type].from_pretrained(tmp_path).eval()
    reprocessor = ImageOnlyQwenVLProcessor.from_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).get_vocab() == processor.tokenizer.get_vocab()
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
    inputs = reprocessor(text=[text], images=[shape_images[0]], return_tensors="pt", return_mm_token_type_ids=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reloaded(**inputs).logits)


def test_processor_needs_no_video_processor(shape_images):
    _, processor = build_tiny_backbone()
    assert not hasattr(processor, "video_processor") or processor.video_processor is None
    text = "<|vision_start|><|image_pad|><|vision_end|>hi"
    encoded = processor(text=[text], images=[shape_images[0]], return_tensors="pt", return_mm_token_type_ids=True)
    grid = encoded["image_grid_thw"][0].tolist()
    assert grid == [1, 8, 8]  # 112 px / 14 px patches
    assert encoded["pixel_values"].shape == (64, 3 * 2 * 14 * 14)  # still image duplicated to T=2
    assert int((encoded["input_ids"] == processor.image_token_id).sum()) == 64 // 4


def test_mrope_positions_for_text_image_text():
    types = [0, 0, 1, 1, 1, 1, 0, 0]
    positions, next_position = mrope_positions(types, [(1, 4, 4)], spatial_merge=2, start=5)
    assert positions[:, :2].tolist() == [[5, 6]] * 3
    assert positions[0, 2:6].tolist() == [7, 7, 7, 7]  # time
    assert positions[1, 2:6].tolist() == [7, 7, 8, 8]  # rows
    assert positions[2, 2:6].tolist() == [7, 8, 7, 8]  # columns
    assert positions[:, 6:].tolist() == [[9, 10]] * 3
    assert next_position == 11
