"""The unit everything is encoded from: an item of text and/or one visual input (an image or
a video), plus an instruction.

Users pass plain dicts (``{"text": ..., "image": ..., "video": ..., "instruction": ...}``), strings, or
:class:`Item` objects; :func:`as_items` turns them into validated :class:`Item` objects and
names the index of the first bad one, so an error in row 4,312 of a corpus says so.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

from PIL import Image

ImageSource = Union[str, os.PathLike, Image.Image]
#: A video file (mp4, webm, avi, mkv, ...), a directory of frame images, or a list of frames
#: (paths or PIL images). Decoding and frame sampling: :mod:`rematch.data.video`.
VideoSource = Union[str, os.PathLike, Sequence[ImageSource]]

# MMEB writes Phi-3 style placeholders (<|image_1|>); other datasets write <image>.
IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>|<image>")
# The same two spellings for a video (MMEB-V2 writes <|video_1|>).
VIDEO_PLACEHOLDER = re.compile(r"<\|video_\d+\|>|<video>")


class ItemError(ValueError):
    """An item cannot be encoded; the message names the item and what is wrong."""


@dataclass(frozen=True)
class Item:
    """Text and/or one visual input (an image or a video) to embed, with an optional task instruction.

    ``text`` may contain one placeholder (``<|image_1|>`` / ``<image>`` for an image,
    ``<|video_1|>`` / ``<video>`` for a video) marking where the visual input goes; without
    one it is placed before the text. An item holds an image or a video, never both: the
    vision tower gives one block of visual tokens per item, which is what lets a batch be
    cut into rows without re-processing (see :meth:`rematch.backbones.base.EncoderBatch.rows`).
    """

    text: str | None = None
    image: ImageSource | None = None
    instruction: str | None = None
    video: VideoSource | None = None

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @property
    def has_video(self) -> bool:
        return self.video is not None

    @property
    def has_visual(self) -> bool:
        """Whether the item carries an image or a video."""
        return self.image is not None or self.video is not None

    def cache_key(self) -> str:
        """A stable identity of the item's content (used by embedding caches).

        The key has the video only when there is one, so every text/image item keeps the key
        (and the cached vectors) it had before videos existed.
        """
        key = (self.text, _image_key(self.image), self.instruction)
        if self.video is not None:
            key += (video_key(self.video),)
        return repr(key)


def _image_key(image: ImageSource | None) -> str | None:
    if isinstance(image, Image.Image):
        digest = hashlib.sha1(image.tobytes()).hexdigest()
        return f"pil:{image.mode}:{image.size}:{digest}"
    return None if image is None else str(Path(image))


def video_key(video: VideoSource) -> str | tuple:
    """A video's identity: a file or frame directory by its path, a frame list by each frame (a
    PIL frame by its pixels)."""
    if isinstance(video, (str, os.PathLike)):
        return "video:" + str(Path(video))
    return ("frames",) + tuple(_image_key(frame) for frame in video)


ItemLike = Union[Item, str, Mapping[str, Any]]


#: Unicode categories that draw nothing: format characters (zero-width space and joiners, bidi
#: overrides and isolates, the BOM), controls, separators.
_INVISIBLE = frozenset({"Cf", "Cc", "Zs", "Zl", "Zp"})


def has_visible_text(text: str) -> bool:
    """Whether ``text`` has a character that is seen: a text of only zero-width or bidi-override
    characters was embedded as if it had content."""
    return any(unicodedata.category(character) not in _INVISIBLE for character in text)


def as_item(value: ItemLike, index: int = 0, where: str = "item") -> Item:
    """Validate one item-like value; errors name ``where`` and ``index``."""
    if isinstance(value, Item):
        item = value
    elif isinstance(value, str):
        item = Item(text=value)
    elif isinstance(value, Mapping):
        unknown = set(value) - {"text", "image", "video", "instruction", "id"}
        if unknown:
            raise ItemError(f"{where} {index}: unknown field(s) {sorted(unknown)}; "
                            "expected text, image, video, instruction")
        item = Item(text=value.get("text"), image=value.get("image"), instruction=value.get("instruction"),
                    video=value.get("video"))
    else:
        raise ItemError(f"{where} {index}: expected a dict, str or Item, got {type(value).__name__}")
    if item.text is not None and not isinstance(item.text, str):
        raise ItemError(f"{where} {index}: field 'text' must be a string, got {type(item.text).__name__}")
    if item.instruction is not None and not isinstance(item.instruction, str):
        raise ItemError(f"{where} {index}: field 'instruction' must be a string")
    if item.image is not None and not isinstance(item.image, (str, os.PathLike, Image.Image)):
        raise ItemError(f"{where} {index}: field 'image' must be a path or a PIL image, "
                        f"got {type(item.image).__name__}")
    for name in ("text", "instruction", "image"):
        _check_encodable(getattr(item, name), f"{where} {index}: field {name!r}")
    if isinstance(item.image, str) and not item.image.strip():
        item = replace(item, image=None)
    item = replace(item, video=_checked_video(item.video, f"{where} {index}"))
    if item.image is not None and item.video is not None:
        raise ItemError(f"{where} {index}: has both an image and a video; an item holds at most one visual "
                        "input (split it into two items)")
    text = item.text or ""
    bare = VIDEO_PLACEHOLDER.sub("", IMAGE_PLACEHOLDER.sub("", text)).strip()
    has_text = has_visible_text(bare)
    if not has_text and not item.has_visual:
        if bare:
            raise ItemError(f"{where} {index}: field 'text' holds only invisible characters (zero-width, bidi "
                            "override or other format characters), so the item is empty")
        raise ItemError(f"{where} {index}: has neither text nor image nor video")
    for pattern, kind, present in ((IMAGE_PLACEHOLDER, "image", item.image), (VIDEO_PLACEHOLDER, "video", item.video)):
        placeholders = len(pattern.findall(text))
        if placeholders > 1:
            raise ItemError(f"{where} {index}: field 'text' has {placeholders} {kind} placeholders; "
                            f"an item holds at most one {kind}")
        if placeholders == 1 and present is None:
            raise ItemError(f"{where} {index}: field 'text' has {'an' if kind == 'image' else 'a'} {kind} "
                            f"placeholder but the item has no {kind}")
    return item


def _checked_video(video: Any, where: str) -> VideoSource | None:
    """The ``video`` field as a path or a tuple of frames (a list becomes a tuple: items are
    values); None for an empty path. Wrong types and empty frame lists are errors naming the
    field and, for a frame, its index."""
    if video is None:
        return None
    if isinstance(video, (str, os.PathLike)):
        _check_encodable(os.fspath(video), f"{where}: field 'video'")
        return None if isinstance(video, str) and not video.strip() else video
    if not isinstance(video, (list, tuple)):
        raise ItemError(f"{where}: field 'video' must be a path (a video file or a directory of frames) or a "
                        f"list of frames (paths or PIL images), got {type(video).__name__}")
    if not video:
        raise ItemError(f"{where}: field 'video' is an empty list of frames")
    for position, frame in enumerate(video):
        if not isinstance(frame, (str, os.PathLike, Image.Image)):
            raise ItemError(f"{where}: field 'video' frame {position} must be a path or a PIL image, "
                            f"got {type(frame).__name__}")
        if isinstance(frame, str) and not frame.strip():
            raise ItemError(f"{where}: field 'video' frame {position} is an empty path")
        _check_encodable(frame, f"{where}: field 'video' frame {position}")
    return tuple(video)


def _check_encodable(value: Any, where: str) -> None:
    """A string the tokenizer (and a JSON or UTF-8 writer) can take: JSON's ``"\\ud800"`` escape
    decodes to a lone surrogate, which crashed deep inside the tokenizer with a traceback."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ItemError(f"{where} holds an invalid character ({error.object[error.start]!r} at position "
                            f"{error.start}: a lone UTF-16 surrogate); fix the text's encoding") from None


def as_items(values: Iterable[ItemLike], where: str = "item") -> list[Item]:
    """Validate a batch of item-like values (see :func:`as_item`)."""
    if isinstance(values, (str, Mapping, Item)):
        values = [values]
    return [as_item(value, index, where) for index, value in enumerate(values)]
