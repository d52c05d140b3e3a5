"""The unit everything is encoded from: an item of text and/or one image, plus an instruction.

Users pass plain dicts (``{"text": ..., "image": ..., "instruction": ...}``), strings, or
:class:`Item` objects; :func:`as_items` turns them into validated :class:`Item` objects and
names the index of the first bad one, so an error in row 4,312 of a corpus says so.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

from PIL import Image

ImageSource = Union[str, os.PathLike, Image.Image]

# MMEB writes Phi-3 style placeholders (<|image_1|>); other datasets write <image>.
IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>|<image>")


class ItemError(ValueError):
    """An item cannot be encoded; the message names the item and what is wrong."""


@dataclass(frozen=True)
class Item:
    """Text and/or one image to embed, with an optional task instruction.

    ``text`` may contain one image placeholder (``<|image_1|>`` or ``<image>``) marking where
    the image goes; without one the image is placed before the text.
    """

    text: str | None = None
    image: ImageSource | None = None
    instruction: str | None = None

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def cache_key(self) -> str:
        """A stable identity of the item's content (used by embedding caches)."""
        image = self.image
        if isinstance(image, Image.Image):
            digest = hashlib.sha1(image.tobytes()).hexdigest()
            image = f"pil:{image.mode}:{image.size}:{digest}"
        elif image is not None:
            image = str(Path(image))
        return repr((self.text, image, self.instruction))


ItemLike = Union[Item, str, Mapping[str, Any]]


def as_item(value: ItemLike, index: int = 0, where: str = "item") -> Item:
    """Validate one item-like value; errors name ``where`` and ``index``."""
    if isinstance(value, Item):
        item = value
    elif isinstance(value, str):
        item = Item(text=value)
    elif isinstance(value, Mapping):
        unknown = set(value) - {"text", "image", "instruction", "id"}
        if unknown:
            raise ItemError(f"{where} {index}: unknown field(s) {sorted(unknown)}; "
                            "expected text, image, instruction")
        item = Item(text=value.get("text"), image=value.get("image"), instruction=value.get("instruction"))
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
        item = Item(text=item.text, image=None, instruction=item.instruction)
    has_text = bool(item.text and IMAGE_PLACEHOLDER.sub("", item.text).strip())
    if not has_text and item.image is None:
        raise ItemError(f"{where} {index}: has neither text nor image")
    placeholders = len(IMAGE_PLACEHOLDER.findall(item.text or ""))
    if placeholders > 1:
        raise ItemError(f"{where} {index}: field 'text' has {placeholders} image placeholders; "
                        "an item holds at most one image")
    if placeholders == 1 and item.image is None:
        raise ItemError(f"{where} {index}: field 'text' has an image placeholder but the item has no image")
    return item


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
