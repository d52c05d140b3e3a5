"""Bad and awkward input: clear errors that name the item, and every image mode converted to RGB."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rematch import ItemError
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
