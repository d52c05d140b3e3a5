"""Test clips shared by the video tests: frames of a square sliding over noise, an mp4 of them,
and training rows that mix them with text and images."""

from __future__ import annotations

import av
import numpy as np
from PIL import Image

from rematch.data.items import Item
from rematch.data.records import TrainExample


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


def video_examples(items: list[Item], clip_frames=moving_square) -> list[TrainExample]:
    """Four training rows with videos on every side (query, positive, hard negative), built on a
    test file's ``mixed_items()`` (items 1 and 3 videos, item 2 an image) and its own clip maker
    (``clip_frames(count, colour, seed)``, the file's frame size and motion)."""
    squares = [tuple(clip_frames(4, colour, seed)) for seed, colour in enumerate(
        [(200, 200, 40), (40, 200, 200), (200, 40, 200)])]
    return [TrainExample(Item(text="which clip shows a red square?"), items[1], (items[3],)),
            TrainExample(items[1], Item(text="the square moves right"), (Item(text="it moves left"),)),
            TrainExample(Item(text="a yellow square"), Item(video=squares[0]), (items[2],)),
            TrainExample(Item(video=squares[1], text="<|video_1|> colour?"), Item(text="cyan"),
                         (Item(video=squares[2]),))]
