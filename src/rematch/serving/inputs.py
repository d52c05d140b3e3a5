"""Request fields -> validated :class:`~rematch.data.items.Item` objects, each error naming its item.

The JSON shapes clients send: a string, a list of strings, or objects ``{"text", "image",
"instruction"}`` (OpenAI's ``input``, Cohere/Jina's ``documents``, our ``query``). Checking
structure and decoding images happen here, per request and before batching, so a bad
item is answered with 422/400 naming ``input[2].image`` and never reaches (or fails) a
batch shared with other requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rematch.data.items import Item, ItemError, as_item
from rematch.serving.errors import BadValue, SchemaError

ITEM_FIELDS = ("text", "image", "instruction")


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how large they may be (from :class:`ServeSettings` and the model)."""

    files_root: Path | None
    max_pixels: int
    max_file_bytes: int
    model_min_pixels: int
    model_max_pixels: int
    model_image_factor: int = 28  # image sides are multiples of this (the adapter's image_factor)


def parse_item(value: Any, param: str, policy: ImagePolicy) -> Item:
    """One string or ``{text, image, instruction}`` object -> an Item with its image decoded."""
    if isinstance(value, str):
        raw = {"text": value}
    elif isinstance(value, dict):
        unknown = sorted(set(value) - set(ITEM_FIELDS))
        if unknown:
            raise SchemaError(f"{param}.{unknown[0]}", f"unknown field; an item has {', '.join(ITEM_FIELDS)}")
        raw = value
    else:
        raise SchemaError(param, f"expected a string or an object with {', '.join(ITEM_FIELDS)}, "
                                 f"got {json_type(value)}")
    for name in ITEM_FIELDS:
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise SchemaError(f"{param}.{name}", f"expected a string, got {json_type(raw[name])}")
    text, image, instruction = (raw.get(name) for name in ITEM_FIELDS)
    if image is not None and not image.strip():
        image = None
    if text is not None and image is None and not text.strip():
        raise BadValue(param, "has neither text nor image (the text is empty)")
    decoded = None
    if image is not None:
        from rematch.serving.images import decode_request_image

        decoded = decode_request_image(image, f"{param}.image", files_root=policy.files_root,
                                       max_pixels=policy.max_pixels, max_file_bytes=policy.max_file_bytes,
                                       model_min_pixels=policy.model_min_pixels,
                                       model_max_pixels=policy.model_max_pixels,
                                       model_image_factor=policy.model_image_factor)
    try:
        return as_item(Item(text=text, image=decoded, instruction=instruction), 0, where=param)
    except ItemError as error:
        raise BadValue(param, str(error).removeprefix(f"{param} 0: ")) from None


def parse_items(value: Any, param: str, policy: ImagePolicy, limit: int) -> list[Item]:
    """A string or a non-empty list of strings/items (at most ``limit``) -> Items."""
    if isinstance(value, str):
        return [parse_item(value, param, policy)]
    if not isinstance(value, list):
        raise SchemaError(param, f"expected a string or a list of strings/items, got {json_type(value)}")
    if not value:
        raise BadValue(param, "is an empty list")
    if len(value) > limit:
        raise BadValue(param, f"has {len(value)} entries, more than this server's limit of {limit}")
    if all(isinstance(entry, int) and not isinstance(entry, bool) for entry in value):
        raise SchemaError(param, "token-id input is not supported; send text (or items with images)")
    return [parse_item(entry, f"{param}[{index}]", policy) for index, entry in enumerate(value)]


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type (what the client wrote)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
