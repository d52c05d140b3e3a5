"""A Qwen-VL processor for text, still images and videos that needs no torchvision.

transformers 5's ``Qwen2VLProcessor`` insists on a video processor, and the video
processor imports torchvision, which is missing or broken on many machines. This subclass
keeps the image path (the PIL image processor, image-token expansion, the
``mm_token_type_ids`` that M-RoPE needs) and does the video path itself, in numpy
(:func:`video_patches`): frames that :mod:`rematch.data.video` already sampled and sized are
normalised exactly as the image processor normalises an image and cut into the tower's
(temporal 2 x 14 x 14) patches in the layout transformers' video processor writes. It loads
a real checkpoint's tokenizer and ``preprocessor_config.json``, with or without torchvision.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from transformers import AutoTokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin
from transformers.video_utils import make_batched_videos

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


def patch_times(frame_times: Sequence[float], temporal_patch_size: int) -> list[float]:
    """The time of each temporal patch of a video: the mean of its first and last frame's time.

    A frame count that is not a multiple of the patch size gets its last time repeated, as
    the frames do (transformers' ``Qwen3VLProcessor._calculate_timestamps`` numbers them so).
    """
    times = [float(time) for time in frame_times]
    if not times:
        raise ValueError("a video needs at least one frame time")
    times += [times[-1]] * (-len(times) % temporal_patch_size)
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def timestamped_video_text(frame_times: Sequence[float], grid: Sequence[int], merge_size: int,
                           temporal_patch_size: int, video_token: str = VIDEO_TOKEN) -> str:
    """Qwen3-VL's text for one video: per temporal patch ``<t seconds>`` (one decimal) and that
    patch's tokens between ``<|vision_start|>`` and ``<|vision_end|>``.

    Qwen3-VL tells the model when each frame pair was shot in words, not through position
    ids, so the text depends on the frame times, not only on the grid.
    """
    t, h, w = (int(v) for v in grid)
    times = patch_times(frame_times, temporal_patch_size)
    if len(times) != t:
        raise ValueError(f"{len(times)} temporal patches of frame times for a video grid of {t}")
    tokens = video_token * (h * w // merge_size ** 2)
    return "".join(f"<{time:.1f} seconds>{VISION_START}{tokens}{VISION_END}" for time in times)


def video_patches(frames: np.ndarray, image_processor) -> tuple[np.ndarray, list[int]]:
    """One video's (T, H, W, 3) uint8 frames -> its flat patches (t*h*w, C*T_p*P*P) and grid (t, h, w).

    The frames must already be sized for the tower (sides multiples of patch x merge size);
    an odd frame count gets its last frame repeated up to the temporal patch size, as
    transformers does. Rows come out in the vision tower's order: time, then merge windows
    row by row, then the patches inside a window; each row holds channel, time, patch row
    and patch column, the layout of transformers' Qwen2-VL video processor (a video of one
    repeated frame gives exactly the image processor's patches of that frame).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected (frames, height, width, 3) video frames, got shape {tuple(frames.shape)}")
    patch, merge = int(image_processor.patch_size), int(image_processor.merge_size)
    temporal = int(image_processor.temporal_patch_size)
    count, height, width, channels = frames.shape
    if height % (patch * merge) or width % (patch * merge):
        raise ValueError(f"video frames of {width} x {height} px: both sides must be multiples of "
                         f"{patch * merge} (resize them with rematch.data.video.resize_frames)")
    pixels = frames.astype(np.float32) * np.float32(image_processor.rescale_factor)
    mean = np.asarray(image_processor.image_mean, dtype=np.float32)
    std = np.asarray(image_processor.image_std, dtype=np.float32)
    pixels = ((pixels - mean) / std).transpose(0, 3, 1, 2)  # (T, C, H, W)
    if missing := -count % temporal:
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], missing, axis=0)])
        count += missing
    grid_t, grid_h, grid_w = count // temporal, height // patch, width // patch
    patches = pixels.reshape(grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return (np.ascontiguousarray(patches).reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch),
            [grid_t, grid_h, grid_w])


class ProcessorConfigError(ValueError):
    """A model's ``preprocessor_config.json`` holds values no image can be cut with."""


def check_image_processor(image_processor, where: str) -> None:
    """The patch geometry every image and video is cut with: positive integers, checked on load
    (``patch_size: 0`` failed with a ZeroDivisionError deep in the first encode)."""
    for name in ("patch_size", "merge_size", "temporal_patch_size"):
        value = getattr(image_processor, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
            raise ProcessorConfigError(f"{where}: {name} must be an integer within 1..1024, got {value!r}")
    size = getattr(image_processor, "size", None) or {}
    bounds = {name: size.get(key, getattr(image_processor, name, None))
              for name, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge"))}
    for name, value in bounds.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ProcessorConfigError(f"{where}: {name} must be an integer >= 1, got {value!r}")
    if None not in bounds.values() and bounds["min_pixels"] > bounds["max_pixels"]:
        raise ProcessorConfigError(f"{where}: min_pixels ({bounds['min_pixels']}) > max_pixels "
                                   f"({bounds['max_pixels']})")


class ImageOnlyQwenVLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without torchvision: works for Qwen2-VL, Qwen2.5-VL and Qwen3-VL still images
    (Qwen3-VL's own processor expands an image to the same ``<|image_pad|>`` run; its patch size
    comes from the checkpoint's ``preprocessor_config.json``), and for videos (Qwen3-VL's
    timestamped layout with :attr:`timestamped_videos`).

    (The name is historical: it first dropped video.) ``videos`` are sampled, equally sized
    frames (:mod:`rematch.data.video`): per video a (T, H, W, 3) uint8 array or a list of PIL
    frames, patched by :func:`video_patches` instead of transformers' torchvision video processor.
    """

    #: No torchvision video processor: :meth:`_process_videos` does its work (``ProcessorMixin``
    #: runs the video path only when this attribute exists).
    video_processor = None

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        # Skip Qwen2VLProcessor.__init__, which requires a video processor.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "ImageOnlyQwenVLProcessor":
        """Load the tokenizer and image processor of a local directory or hub checkpoint."""
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path, **kwargs)
        check_image_processor(image_processor, f"{name_or_path}/preprocessor_config.json")
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    #: How a video is written in the text: False, one ``<|video_pad|>`` run (Qwen2-VL, Qwen2.5-VL);
    #: True, Qwen3-VL's timestamped frame groups (:func:`timestamped_video_text`), which need each
    #: video's frame times (``video_metadata``). The Qwen3-VL adapter sets it on its processor.
    timestamped_videos = False

    def _process_videos(self, videos: Sequence, video_metadata: Sequence | None = None,
                        **kwargs) -> tuple[dict, list[str]]:
        """Patches and grids of every video, and the text that stands for each (:meth:`video_text`).

        ``video_metadata``: per video, transformers' ``VideoMetadata`` whose ``timestamps``
        are the sampled frames' times in seconds (needed for :attr:`timestamped_videos`)."""
        patches, grids = zip(*(video_patches(np.asarray(video, dtype=np.uint8), self.image_processor)
                               for video in make_batched_videos(videos)))
        metadata = list(video_metadata) if video_metadata is not None else [None] * len(grids)
        if len(metadata) != len(grids):
            raise ValueError(f"{len(metadata)} video metadata entries for {len(grids)} videos")
        replacements = [self.video_text(grid, entry) for grid, entry in zip(grids, metadata)]
        processed = {"pixel_values_videos": np.concatenate(patches), "video_grid_thw": np.asarray(grids, dtype=np.int64)}
        return processed, replacements

    def video_text(self, grid: Sequence[int], metadata=None) -> str:
        """The text that stands for one video of grid (t, h, w) in the prompt."""
        merge = int(self.image_processor.merge_size)
        if not self.timestamped_videos:
            t, h, w = (int(v) for v in grid)
            return self.video_token * (t * h * w // merge ** 2)
        if metadata is None:
            raise ValueError("timestamped videos (Qwen3-VL) need each video's frame times: pass video_metadata")
        return timestamped_video_text(metadata.timestamps, grid, merge, int(self.image_processor.temporal_patch_size),
                                      self.video_token)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the tokenizer files and ``preprocessor_config.json`` (the layout of a real checkpoint)."""
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)
