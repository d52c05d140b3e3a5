"""``usage.prompt_tokens``: how many tokens the model reads for a request's items.

OpenAI-compatible clients budget and bill by it. The count is the item's text and
instruction tokens, one token per 28 x 28 pixel patch of its (already resized) image, and
the K learnable tokens; the chat template's few fixed tokens are not counted. It runs on
the model's worker thread, because the tokenizer is not safe to share between threads.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from rematch.data.images import PATCH_FACTOR
from rematch.data.items import Item


def count_tokens(model, items: Sequence[Item]) -> int:
    """Input tokens of ``items`` for ``model`` (see the module docstring)."""
    tokenizer = model.adapter.tokenizer
    texts = [text for item in items for text in (item.text, item.instruction) if text]
    total = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
    for item in items:
        if isinstance(item.image, Image.Image):  # requests carry images decoded and resized for the model
            width, height = item.image.size
            total += max(1, (width // PATCH_FACTOR) * (height // PATCH_FACTOR))
    return total + model.num_tokens * len(items)
