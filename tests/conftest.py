"""Shared fixtures: tiny real models (random weights, real architectures) and test images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rematch import ReMatchModel
from rematch.data.synthetic import Scene, ShapeObject, render

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model() -> ReMatchModel:
    return ReMatchModel.tiny(size="tiny", backbone="qwen2_vl", k=16, seed=0)


@pytest.fixture(scope="session")
def tiny_model_25() -> ReMatchModel:
    return ReMatchModel.tiny(size="tiny", backbone="qwen2_5_vl", k=16, seed=0)


@pytest.fixture(scope="session")
def shape_images() -> list[Image.Image]:
    scenes = [
        Scene((ShapeObject("red", "circle", "large", 0.5, 0.5),)),
        Scene((ShapeObject("blue", "star", "small", 0.3, 0.5), ShapeObject("green", "square", "large", 0.7, 0.5))),
        Scene((ShapeObject("yellow", "triangle", "large", 0.5, 0.3),)),
    ]
    return [render(scene) for scene in scenes]


@pytest.fixture()
def image_files(tmp_path, shape_images) -> dict[str, str]:
    """The same picture saved in the awkward modes real corpora contain."""
    base = shape_images[1]
    paths = {}
    paths["rgb"] = tmp_path / "rgb.png"
    base.save(paths["rgb"])
    paths["gray"] = tmp_path / "gray.png"
    base.convert("L").save(paths["gray"])
    paths["rgba"] = tmp_path / "rgba.png"
    base.convert("RGBA").save(paths["rgba"])
    paths["palette"] = tmp_path / "palette.png"
    base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(paths["palette"])
    paths["gray16"] = tmp_path / "gray16.png"
    values = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(values).save(paths["gray16"])
    paths["jpeg"] = tmp_path / "photo.jpg"
    base.save(paths["jpeg"], quality=90)
    paths["corrupt"] = tmp_path / "corrupt.png"
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return {name: str(path) for name, path in paths.items()}
