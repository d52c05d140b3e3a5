"""Turn a video -- a file, a directory of frames, or a list of frames -- into the few RGB frames
a Qwen-VL vision tower sees.

Why decode here with PyAV and not with transformers' video processor: that processor imports
torchvision, which is missing or broken on many machines, and it decodes whole videos before
sampling. Here only the sampled frames are converted to images, sampling follows the model
configuration (``video_fps``, ``video_max_frames``), and every failure names the item and the
file (or the frame), so a corrupt clip in row 4,312 of a corpus says so -- the same contract
as :mod:`rematch.data.images`.

Two sampling rules (``sampling``):

* ``"fps"`` (the model's own, used in training and ``encode``): a file is sampled at ``fps``
  frames per second of its own timeline, uniformly from the first to the last frame, at most
  ``max_frames`` frames. Frames given as a directory or a list are taken to be already
  sampled at ``fps`` (how MMEB-V2 and the built-in world store clips), so only ``max_frames``
  thins them.
* ``"mmeb_v2"`` (the MMEB-V2 evaluation rule, :func:`mmeb_v2_indices`): exactly the frames the
  official harness (TIGER-AI-Lab/VLM2Vec, ``process_video_frames``) hands its model: of ``n``
  saved frames, ``np.linspace(0, n - 1, max_frames, dtype=int)`` when ``max_frames <= n``,
  else all ``n``. A file is first cut to the frames the harness would save from it
  (``save_frames``: every frame up to 64, else ``floor(i * total / 64)`` for i < 64), then the
  same rule picks among those. ``fps`` plays no part in which frames are taken.

Timestamps (Qwen3-VL writes them into the prompt, Qwen2.5-VL spaces temporal positions by
them): a file gives each frame its decoded presentation time, relative to the first frame
(``index / native fps`` only where the stream has no time stamps). A directory or a list of
frames has no timeline, so the rule is written down instead of invented per call: frame ``i``
of the saved frames is at ``i / fps`` seconds (the frames are taken to be saved at ``fps``;
for MMEB-V2's frame directories, whose spacing is not recorded, this is a convention).

Qwen-VL merges frames two by two (temporal patch 2); an odd count gets its last frame
repeated, as Qwen's own processor does.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from rematch.data.images import (
    MAX_ASPECT_RATIO,
    MAX_DECODE_PIXELS,
    PATCH_FACTOR,
    ImageLoadError,
    open_image,
    target_size,
)
from rematch.data.items import ImageSource, VideoSource

#: File names taken as frames in a frame directory (anything else there is ignored).
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
#: The frame sampling rules (see the module docstring).
SAMPLING_RULES = ("fps", "mmeb_v2")
#: Frames the MMEB-V2 harness saves from a video file before sampling (its ``max_frames_saved``,
#: ``experiments/public/eval/video.yaml``).
MMEB_V2_FRAMES_SAVED = 64


class VideoLoadError(ImageLoadError):
    """A video could not be opened, decoded or used; the message names the item and the file
    (and the frame, when one frame of a directory or list is the problem)."""


@dataclass(frozen=True)
class VideoFrames:
    """The sampled frames of one video, in order, as 8-bit RGB PIL images of one size."""

    frames: list[Image.Image]
    timestamps: list[float]
    """Seconds from the start of the video of each frame (a repeated last frame repeats its time)."""
    fps: float
    """Sampled frames per second (real frames only): Qwen2.5-VL spaces its temporal position
    ids by the seconds one temporal patch spans, ``temporal_patch_size / fps``."""
    source: str = "<frames>"
    """The file or directory the frames came from (for messages)."""

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every frame."""
        return self.frames[0].size

    def array(self) -> np.ndarray:
        """The frames as one (T, H, W, 3) uint8 array."""
        return np.stack([np.asarray(frame, dtype=np.uint8) for frame in self.frames])


def sample_indices(total: int, wanted: int) -> list[int]:
    """``wanted`` indices spread uniformly over ``range(total)``, first and last frame included."""
    if wanted >= total:
        return list(range(total))
    if wanted == 1:
        return [0]
    return [round(i * (total - 1) / (wanted - 1)) for i in range(wanted)]


def mmeb_v2_indices(total: int, wanted: int) -> list[int]:
    """The MMEB-V2 harness's frames of ``total`` saved ones: ``np.linspace(0, total - 1, wanted,
    dtype=int)`` when ``wanted <= total``, else every frame (its ``process_video_frames``)."""
    if total < 1 or wanted < 1:
        raise ValueError(f"need total >= 1 and wanted >= 1, got total={total}, wanted={wanted}")
    if wanted > total:
        return list(range(total))
    return [int(index) for index in np.linspace(0, total - 1, wanted, dtype=int)]


def mmeb_v2_saved_indices(total: int, saved: int = MMEB_V2_FRAMES_SAVED) -> list[int]:
    """The frames the MMEB-V2 harness saves from a video file of ``total`` frames (its
    ``save_frames``): all of them up to ``saved``, else ``floor(i * total / saved)``."""
    if total <= saved:
        return list(range(total))
    step = total / saved
    return [math.floor(i * step) for i in range(saved)]


def frame_count(duration: float, fps: float, max_frames: int, available: int) -> int:
    """How many frames to sample from ``available`` frames spanning ``duration`` seconds."""
    return max(1, min(available, max_frames, round(duration * fps)))


def load_video_frames(source: VideoSource, fps: float, max_frames: int, where: str = "item 0",
                      multiple_of: int = 2, sampling: str = "fps") -> VideoFrames:
    """Sample a video's frames (see the module docstring); errors are :class:`VideoLoadError`.

    ``multiple_of`` is the tower's temporal patch size: the last frame is repeated until
    the count is a multiple of it. ``sampling`` is one of :data:`SAMPLING_RULES`.
    """
    if fps <= 0 or max_frames < 1:
        raise ValueError(f"video sampling needs fps > 0 and max_frames >= 1, got fps={fps}, max_frames={max_frames}")
    if sampling not in SAMPLING_RULES:
        raise ValueError(f"video sampling must be one of {SAMPLING_RULES}, got {sampling!r}")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise VideoLoadError(f"{where}: video file not found: {path}", path)
        if path.is_dir():
            video = _sample_frame_list(_frame_files(path, where), fps, max_frames, where, str(path), sampling)
        elif path.is_file():
            video = _decode_file(path, fps, max_frames, where, sampling)
        else:  # a FIFO or device would block or stream forever
            raise VideoLoadError(f"{where}: video {path} is not a regular file or a directory of frames", path)
    elif isinstance(source, (list, tuple)):
        if not source:
            raise VideoLoadError(f"{where}: the video is an empty list of frames")
        video = _sample_frame_list(list(source), fps, max_frames, where, "<frames>", sampling)
    else:
        raise VideoLoadError(f"{where}: a video must be a path or a list of frames, got {type(source).__name__}")
    return _pad_frames(video, multiple_of)


def _pad_frames(video: VideoFrames, multiple_of: int) -> VideoFrames:
    missing = -len(video) % max(1, multiple_of)
    if not missing:
        return video
    return replace(video, frames=video.frames + [video.frames[-1]] * missing,
                   timestamps=video.timestamps + [video.timestamps[-1]] * missing)


def _natural_key(name: str) -> list:
    """frame_2 before frame_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _frame_files(directory: Path, where: str) -> list[Path]:
    try:
        names = sorted((entry.name for entry in os.scandir(directory)
                        if entry.name.lower().endswith(FRAME_EXTENSIONS) and entry.is_file()), key=_natural_key)
    except OSError as error:
        raise VideoLoadError(f"{where}: cannot list the frame directory {directory}: {error}", directory) from error
    if not names:
        raise VideoLoadError(f"{where}: the frame directory {directory} holds no frame images "
                             f"({', '.join(FRAME_EXTENSIONS)})", directory)
    return [directory / name for name in names]


def _sample_frame_list(frames: list[ImageSource], fps: float, max_frames: int, where: str,
                       source: str, sampling: str = "fps") -> VideoFrames:
    """Frames already sampled at ``fps``: keep at most ``max_frames``, opening only those."""
    if sampling == "mmeb_v2":
        indices = mmeb_v2_indices(len(frames), max_frames)
    else:
        indices = sample_indices(len(frames), min(len(frames), max_frames))
    wanted = len(indices)
    images = []
    for index in indices:
        frame = frames[index]
        name = f" ({frame})" if isinstance(frame, (str, os.PathLike)) else ""
        try:
            images.append(open_image(frame, where=f"{where}: video frame {index}{name}"))
        except ImageLoadError as error:
            raise VideoLoadError(str(error), error.path or (None if source == "<frames>" else source)) from error
    images = _same_size(images, where)
    sampled_fps = fps * wanted / len(frames)
    return VideoFrames(images, [index / fps for index in indices], sampled_fps, source)


def _same_size(frames: list[Image.Image], where: str) -> list[Image.Image]:
    """Frames of a video share one grid: later frames of another size are resized to the first's."""
    size = frames[0].size
    return [frame if frame.size == size else frame.resize(size, Image.Resampling.BICUBIC) for frame in frames]


def _file_indices(total: int, native_fps: float, fps: float, max_frames: int, sampling: str) -> list[int]:
    """Which of a file's ``total`` frames to take under ``sampling`` (module docstring)."""
    if sampling == "mmeb_v2":
        saved = mmeb_v2_saved_indices(total)
        return [saved[i] for i in mmeb_v2_indices(len(saved), max_frames)]
    return sample_indices(total, frame_count(total / native_fps, fps, max_frames, total))


def _decode_file(path: Path, fps: float, max_frames: int, where: str, sampling: str = "fps") -> VideoFrames:
    """Decode the sampled frames of a video file with PyAV (only those become images)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoLoadError(f"{where}: {path} has no video stream", path)
            stream = container.streams.video[0]
            native_fps = float(stream.average_rate or stream.guessed_rate or 0) or None
            total = int(stream.frames or 0)
            width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > MAX_DECODE_PIXELS:
            raise VideoLoadError(f"{where}: video {path} is {width} x {height} pixels per frame, more than the "
                                 f"{MAX_DECODE_PIXELS:,} rematch decodes; shrink it first", path)
        if total <= 0 or native_fps is None:  # the header does not say: count by decoding once
            total, native_fps = _count_frames(path, native_fps)
        if total <= 0:
            raise VideoLoadError(f"{where}: video {path} has no frames", path)
        indices = _file_indices(total, native_fps, fps, max_frames, sampling)
        frames, times, decoded = _decode_indices(path, indices)
        if len(frames) < len(indices):  # the header promised more frames than the stream holds
            if decoded <= 0:
                raise VideoLoadError(f"{where}: video {path} has no decodable frames", path)
            indices = _file_indices(decoded, native_fps, fps, max_frames, sampling)
            frames, times, _ = _decode_indices(path, indices)
    except VideoLoadError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, MemoryError) as error:
        raise VideoLoadError(f"{where}: cannot read video {path}: {error}", path) from error
    if not frames:
        raise VideoLoadError(f"{where}: video {path} has no decodable frames", path)
    sampled_fps = native_fps * len(indices) / max(total, 1)
    timestamps = [time if time is not None else index / native_fps for time, index in zip(times, indices)]
    return VideoFrames(_same_size(frames, where), timestamps, sampled_fps, str(path))


def _count_frames(path: Path, native_fps: float | None) -> tuple[int, float]:
    import av

    count, first, last = 0, None, None
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            count += 1
            if frame.time is not None:
                first = frame.time if first is None else first
                last = frame.time
    if native_fps is None:
        native_fps = (count - 1) / (last - first) if count > 1 and last and first is not None and last > first else 1.0
    return count, native_fps


def _decode_indices(path: Path, indices: Sequence[int]) -> tuple[list[Image.Image], list[float | None], int]:
    """The frames at ``indices`` (sorted), their presentation times in seconds from the first
    frame (None where the stream carries no time stamp), and how many frames were decoded."""
    import av

    wanted = list(indices)
    frames: list[Image.Image] = []
    times: list[float | None] = []
    position = -1
    first_time = None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        next_wanted = 0
        for position, frame in enumerate(container.decode(stream)):
            if position == 0:
                first_time = frame.time
            while next_wanted < len(wanted) and wanted[next_wanted] == position:
                frames.append(frame.to_image().convert("RGB"))
                times.append(None if frame.time is None or first_time is None else float(frame.time - first_time))
                next_wanted += 1
            if next_wanted == len(wanted):
                break
    return frames, times, position + 1


def resize_frames(video: VideoFrames, min_pixels: int, max_pixels: int, factor: int = PATCH_FACTOR,
                  where: str = "item 0") -> VideoFrames:
    """Every frame resized to one size: Qwen's smart resize of the first frame's size (sides
    multiples of ``factor``, the tower's patch x merge size; area within [min, max])."""
    width, height = video.size
    try:
        new_h, new_w = target_size(height, width, min_pixels, max_pixels, factor=factor)
    except ValueError as error:
        raise VideoLoadError(f"{where}: unusable video frame size {width} x {height} ({video.source}): {error}",
                             None if video.source == "<frames>" else video.source) from error
    if max(new_h, new_w) / min(new_h, new_w) > MAX_ASPECT_RATIO:
        raise VideoLoadError(f"{where}: unusable video frame size {width} x {height} ({video.source}): resized to "
                             f"{new_w} x {new_h}, an aspect ratio over {MAX_ASPECT_RATIO}",
                             None if video.source == "<frames>" else video.source)
    if (new_w, new_h) == (width, height):
        return video
    resized = [frame.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0) for frame in video.frames]
    return replace(video, frames=resized)


def load_video_for_model(source: VideoSource, fps: float, max_frames: int, min_pixels: int, max_pixels: int,
                         factor: int = PATCH_FACTOR, where: str = "item 0", multiple_of: int = 2,
                         sampling: str = "fps") -> VideoFrames:
    """Sample, convert and resize a video to exactly the frames the vision tower will see."""
    return resize_frames(load_video_frames(source, fps, max_frames, where, multiple_of=multiple_of,
                                           sampling=sampling),
                         min_pixels, max_pixels, factor, where)


def seconds_per_grid(video: VideoFrames, temporal_patch_size: int) -> float:
    """Seconds one temporal patch of ``video`` spans (Qwen2.5-VL's ``second_per_grid_ts``)."""
    return temporal_patch_size / video.fps if video.fps > 0 and math.isfinite(video.fps) else float(temporal_patch_size)
