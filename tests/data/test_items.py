"""Bad and awkward input: clear errors that name the item, and every image mode converted to RGB."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from rematch import Item, ItemError, ReMatchModel
from rematch.data.images import ImageLoadError, load_image_for_model, open_image, target_size
from rematch.data.items import as_items


def test_missing_image_names_the_item_and_the_file(tiny_model, image_files):
    items = [{"text": "ok"}, {"text": "also ok"}, {"image": "/nowhere/missing.png"}]
    with pytest.raises(ImageLoadError, match=r"item 2: image file not found: /nowhere/missing.png"):
        tiny_model.encode(items)


def test_corrupt_image_names_the_item(tiny_model, image_files):
    with pytest.raises(ImageLoadError, match=r"item 1: cannot read image .*corrupt.png"):
        tiny_model.encode([{"image": image_files["rgb"]}, {"image": image_files["corrupt"]}])


def test_item_without_text_or_image_is_rejected(tiny_model):
    with pytest.raises(ItemError, match="item 1: has neither text nor image"):
        tiny_model.encode([{"text": "fine"}, {"text": "   "}])
    with pytest.raises(ItemError, match="item 0: has neither text nor image"):
        tiny_model.encode([{"text": "<|image_1|>"}])


def test_placeholder_and_image_must_agree():
    with pytest.raises(ItemError, match="item 0: .*placeholder but the item has no image"):
        as_items([{"text": "<|image_1|> Represent the given image."}])
    with pytest.raises(ItemError, match="item 0: .*2 image placeholders"):
        as_items([{"text": "<|image_1|> and <|image_2|>", "image": "a.png"}])
    with pytest.raises(ItemError, match="unknown field"):
        as_items([{"txt": "typo"}])


@pytest.mark.parametrize("mode", ["gray", "rgba", "palette", "gray16", "jpeg"])
def test_awkward_image_modes_encode_like_rgb(tiny_model, image_files, mode):
    image = open_image(image_files[mode])
    assert image.mode == "RGB"
    reference = np.asarray(open_image(image_files["rgb"]), dtype=np.float32)
    converted = np.asarray(image, dtype=np.float32)
    if mode in ("gray", "gray16"):
        reference = np.repeat(reference.mean(axis=2, keepdims=True), 3, axis=2)
    tolerance = 40 if mode in ("palette", "jpeg") else 3
    assert np.abs(converted - reference).mean() < tolerance
    vector = tiny_model.encode([{"image": image_files[mode]}])
    assert np.isfinite(vector).all()


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    assert open_image(rgba).getpixel((10, 10)) == (255, 255, 255)


def test_very_large_image_is_resized_under_max_pixels(tiny_model, tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (6000, 4000), (200, 30, 30)).save(path, quality=50)
    image = load_image_for_model(path, min_pixels=56 * 56, max_pixels=448 * 448)
    width, height = image.size
    assert width * height <= 448 * 448 and width % 28 == 0 and height % 28 == 0
    assert abs(width / height - 1.5) < 0.1
    assert np.isfinite(tiny_model.encode([{"image": str(path)}])).all()


def test_extreme_aspect_ratio_is_a_clear_error(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (5000, 10)).save(path)
    with pytest.raises(ImageLoadError, match="item 0: unusable image size 5000 x 10"):
        load_image_for_model(path, 56 * 56, 448 * 448)


@pytest.mark.parametrize("size", [(30, 30), (112, 112), (1000, 700), (27, 300)])
def test_target_size_is_a_multiple_of_28_within_bounds(size):
    height, width = target_size(size[1], size[0], 56 * 56, 448 * 448)
    assert height % 28 == 0 and width % 28 == 0
    assert 56 * 56 <= height * width <= 448 * 448


@pytest.mark.parametrize("field", ["text", "instruction"])
@pytest.mark.parametrize("token", ["<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|endoftext|>"])
def test_chat_control_tokens_in_user_text_are_refused_with_the_item_named(tiny_model, field, token):
    items = [{"text": "fine"}, {"text": "a caption", field: f"before {token} after"}]
    with pytest.raises(ItemError, match=rf"item 1: field '{field}' contains the chat control token"):
        tiny_model.encode(items)


def test_long_instructions_are_truncated_and_overlong_items_are_refused(tiny_model):
    huge = "represent this " * 20_000
    started = time.perf_counter()
    vector = tiny_model.encode([{"text": "a red circle", "instruction": huge}])
    assert time.perf_counter() - started < 30 and np.isfinite(vector).all()
    limit = tiny_model.config.max_instruction_tokens
    capped = tiny_model.prepare([{"text": "a red circle", "instruction": huge}])
    plain = tiny_model.prepare([{"text": "a red circle", "instruction": "x"}])
    assert capped.input_ids.shape[1] <= plain.input_ids.shape[1] + limit
    strict = ReMatchModel.tiny(num_tokens=2, max_text_tokens=0, max_sequence_tokens=512)
    with pytest.raises(ItemError, match=r"item 0: \d+ tokens .* over model.max_sequence_tokens=512"):
        strict.encode([{"text": "word " * 2000}])


def test_a_fifo_named_like_an_image_is_refused_without_blocking(tiny_model, tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    started = time.perf_counter()
    with pytest.raises(ImageLoadError, match=r"item 1: image .*x.png is not a regular file"):
        tiny_model.encode([{"text": "fine"}, {"image": str(fifo)}])
    assert time.perf_counter() - started < 20


def test_huge_and_extreme_images_get_errors_naming_item_and_file(tiny_model, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("L", (9000, 8000)).save(huge)  # 72M pixels: over the decode bound, a tiny file
    with pytest.raises(ImageLoadError, match=r"item 0: image .*huge.png is 9000 x 8000 pixels"):
        tiny_model.encode([{"image": str(huge)}])
    thin = tmp_path / "thin.png"
    Image.new("RGB", (5000, 20)).save(thin)
    with pytest.raises(ImageLoadError, match=r"item 0: unusable image size 5000 x 20"):
        tiny_model.encode([{"image": str(thin), "text": "x"}])


def test_a_large_16_bit_png_is_converted_in_bounded_memory(tmp_path):
    import tracemalloc

    path = tmp_path / "gray16.png"
    values = (np.arange(3000 * 2000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(2000, 3000)
    Image.fromarray(values).save(path)
    tracemalloc.start()
    try:
        image = load_image_for_model(str(path), 56 * 56, 448 * 448)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.mode == "RGB" and image.size[0] * image.size[1] <= 448 * 448
    assert peak < 16 * 3000 * 2000  # measured 12 bytes a pixel; float64 arithmetic took 32


def test_an_image_is_resized_once_as_plain_transformers_would(tiny_model, tmp_path):
    """100 x 70 px under min = max = 56 x 56: Qwen's smart resize gives 28 x 56 px (below
    min_pixels). The processor must take that as it is; resizing again grew it to 56 x 84 px,
    past max_pixels and unlike plain transformers."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    path = tmp_path / "odd.png"
    Image.new("RGB", (70, 100), (10, 200, 30)).save(path)
    adapter = tiny_model.adapter
    limits = (adapter.config.min_pixels, adapter.config.max_pixels)
    try:
        adapter.config.min_pixels = adapter.config.max_pixels = 56 * 56
        batch = adapter.prepare([Item(image=str(path))], 0)
    finally:
        adapter.config.min_pixels, adapter.config.max_pixels = limits
    height, width = smart_resize(100, 70, factor=28, min_pixels=56 * 56, max_pixels=56 * 56)
    assert batch.image_grid_thw.tolist() == [[1, height // 14, width // 14]]
