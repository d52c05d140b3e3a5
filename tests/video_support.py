"""Test clips shared by the video tests: frames of a square sliding over noise, and an mp4 of them."""

from __future__ import annotations

import av
import numpy as np
from PIL import Image


def moving_square(count: int, colour=(220, 40, 40), seed: int = 0, side: int = 56, step: int = 4,
                  top: int = 18) -> list[Image.Image]:
    """``count`` frames of a 16 px square moving ``step`` px right per frame over a noisy
    background (every frame differs, so a frame mix-up changes the embedding)."""
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(count):
        pixels = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
        left = 4 + index * step % (side - 20)
        pixels[top:top + 16, left:left + 16] = colour
        frames.append(Image.fromarray(pixels))
    return frames


def write_mp4(path, frames: list[Image.Image], fps: int) -> str:
    """Encode ``frames`` as an MPEG-4 file at ``fps`` with PyAV (what a user's clip would be)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)
