"""vLLM's chat-style embedding input: ``messages`` (system + user, text and ``image_url`` parts) -> one Item.

Why: vLLM serves multimodal embedding models (VLM2Vec, GME, DSE) by taking an OpenAI chat
conversation in ``/v1/embeddings`` instead of ``input``; clients written for it send::

    {"messages": [{"role": "system", "content": "Find the picture."},
                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}},
                                               {"type": "text", "text": "a red circle"}]}]}

It maps onto a ReMatch item as ReMatch's own chat format places things: the system turn is
the instruction, the user turn holds the image and the text. Parts are joined as Qwen's
chat template joins them (no separator); an image that follows text is marked with
``<|image_1|>`` at its place, so it lands where the client put it. One request is one item
(vLLM's rule too), and an item has at most one image.
"""

from __future__ import annotations

from typing import Any

from rematch.data.items import Item
from rematch.serving.errors import BadValue, SchemaError
from rematch.serving.inputs import ImagePolicy, json_type, parse_item

IMAGE_MARK = "<|image_1|>"
ROLES = ("system", "user")


def parse_messages(value: Any, param: str, policy: ImagePolicy) -> Item:
    """The ``messages`` of one request -> the Item it describes (images decoded under ``policy``)."""
    if not isinstance(value, list) or not value:
        raise SchemaError(param, f"expected a non-empty list of {{role, content}} messages, got {json_type(value)}")
    instruction: str | None = None
    user: tuple[str | None, str | None] | None = None
    for index, message in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(message, dict):
            raise SchemaError(where, f"expected an object with role and content, got {json_type(message)}")
        unknown = sorted(set(message) - {"role", "content"})
        if unknown:
            raise SchemaError(f"{where}.{unknown[0]}", "unknown field; a message has role and content")
        role = message.get("role")
        if role not in ROLES:
            raise BadValue(f"{where}.role", f"must be one of {', '.join(ROLES)} (an embedding request is one "
                                            f"item: its instruction and its content), got {role!r}")
        text, image = _content(message.get("content"), f"{where}.content", allow_image=role == "user")
        if role == "system":
            if instruction is not None:
                raise BadValue(where, "a second system message; give the instruction in one")
            instruction = text
        else:
            if user is not None:
                raise BadValue(where, "a second user message; one embedding request is one item (send one "
                                      "request per item, or use input with a list of items)")
            user = (text, image)
    if user is None:
        raise BadValue(param, "has no user message (the content to embed)")
    text, image = user
    raw = {"text": text, "image": image, "instruction": instruction or None}
    if text is None and image is None:
        raise BadValue(param, "the user message has neither text nor an image")
    return parse_item({key: item for key, item in raw.items() if item is not None}, param, policy)


def _content(content: Any, where: str, allow_image: bool) -> tuple[str | None, str | None]:
    """(text, image URL) of one message's content: a string, or a list of text / image_url parts."""
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise SchemaError(where, f"expected a string or a list of parts, got {json_type(content)}")
    pieces: list[str] = []
    image: str | None = None
    for index, part in enumerate(content):
        part_where = f"{where}[{index}]"
        if not isinstance(part, dict):
            raise SchemaError(part_where, f"expected an object with a type, got {json_type(part)}")
        kind = part.get("type")
        if kind == "text":
            _only(part, ("type", "text"), part_where)
            if not isinstance(part.get("text"), str):
                raise SchemaError(f"{part_where}.text", f"expected a string, got {json_type(part.get('text'))}")
            pieces.append(part["text"])
        elif kind == "image_url":
            _only(part, ("type", "image_url"), part_where)
            if not allow_image:
                raise BadValue(part_where, "an image belongs in the user message")
            if image is not None:
                raise BadValue(part_where, "a second image; a ReMatch item holds at most one image")
            image = _image_url(part.get("image_url"), f"{part_where}.image_url")
            if "".join(pieces).strip():
                pieces.append(IMAGE_MARK)  # after text: keep the client's order
        else:
            raise BadValue(f"{part_where}.type", f"must be 'text' or 'image_url', got {kind!r}")
    text = "".join(pieces)
    return (text if text.strip() and text.strip() != IMAGE_MARK else None), image


def _image_url(value: Any, where: str) -> str:
    """OpenAI's ``{"url": ...}`` (``detail`` accepted and unused) or a bare URL string."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"url", "detail"})
        if unknown:
            raise SchemaError(f"{where}.{unknown[0]}", "unknown field; image_url has url (and detail)")
        value = value.get("url")
    if not isinstance(value, str):
        raise SchemaError(where, f"expected a URL string (data:image/...;base64,...), got {json_type(value)}")
    return value


def _only(part: dict, fields: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(part) - set(fields))
    if unknown:
        raise SchemaError(f"{where}.{unknown[0]}", f"unknown field; this part has {', '.join(fields)}")
