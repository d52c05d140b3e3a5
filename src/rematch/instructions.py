"""Target-side (document) instructions: what the document side of each task is asked to represent.

MMEB writes the query's instruction into the query text ("Represent the given image with
the following question: ...") but gives the targets none, so a plain VLM2Vec-style model
embeds the label "tench", the answer "two" and a news photo with the same prompt. B3 and
VLM2Vec-V2 give the target side an instruction of its own; the ReMatch paper's ablation
credits it with +1.8 MMEB (65.5 -> 67.3). We do the same:

* every document (training positives and negatives, evaluation candidates, corpus items
  encoded with ``role="document"``) that carries no instruction of its own gets the
  instruction of its subset, or the default one (key ``"*"``) where the subset is unknown;
* the instruction goes where every item instruction goes: the system turn of the chat
  (see :mod:`rematch.backbones.qwen_vl`);
* ``ModelConfig.document_instructions`` switches this off (the VLM2Vec-style baseline), and
  ``ModelConfig.document_instruction_table`` adds or replaces entries;
* a saved model stores the *resolved* table (built-in entries included, see
  :func:`resolved_table`) in ``rematch_config.json``, so it keeps encoding documents the
  way it was trained even if this module's table changes in a later release.

The texts below were written for this project in the style of those papers: short, naming
what the document is (a class label, an answer, a caption, an image...), never the task's
answer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

from rematch.data.items import Item

#: Key of the instruction for documents of subsets the table does not name.
DEFAULT_KEY = "*"

_LABEL = "Represent the given class label for image classification."
_ANSWER = "Represent the given answer to a question about an image."
_IMAGE = "Represent the given image."
_CROP = "Represent the given cropped image of an object."

#: The built-in table: MMEB-V1's 36 evaluation subsets (whose 20 in-distribution ones are
#: the MMEB-train subsets), MMEB-train's spelling ImageNet_1K, and the built-in shapes world.
BUILTIN_DOCUMENT_INSTRUCTIONS: dict[str, str] = {
    DEFAULT_KEY: "Represent the given document for retrieval.",
    # classification: the targets are class names
    "ImageNet-1K": _LABEL, "ImageNet_1K": _LABEL, "ImageNet-A": _LABEL, "ImageNet-R": _LABEL,
    "ObjectNet": _LABEL, "VOC2007": _LABEL,
    "N24News": "Represent the given news category.",
    "HatefulMemes": "Represent the given answer about whether a meme is hateful.",
    "SUN397": "Represent the given scene category.",
    "Place365": "Represent the given scene category.",
    "Country211": "Represent the given country name.",
    # VQA: the targets are short answers
    "OK-VQA": _ANSWER, "A-OKVQA": _ANSWER, "Visual7W": _ANSWER, "VizWiz": _ANSWER, "GQA": _ANSWER,
    "DocVQA": "Represent the given answer to a question about a document image.",
    "InfographicsVQA": "Represent the given answer to a question about an infographic.",
    "ChartQA": "Represent the given answer to a question about a chart.",
    "ScienceQA": "Represent the given answer to a science question.",
    "TextVQA": "Represent the given answer to a question about the text in an image.",
    # retrieval: images, captions, passages
    "VisDial": _IMAGE, "CIRR": _IMAGE, "MSCOCO_t2i": _IMAGE,
    "VisualNews_t2i": "Represent the given news image.",
    "VisualNews_i2t": "Represent the given news caption.",
    "MSCOCO_i2t": "Represent the given image caption.",
    "NIGHTS": "Represent the given image for visual similarity.",
    "WebQA": "Represent the given Wikipedia passage and its image.",
    "OVEN": "Represent the given Wikipedia entity with its image and description.",
    "FashionIQ": "Represent the given fashion product image.",
    "EDIS": "Represent the given news image with its headline.",
    "Wiki-SS-NQ": "Represent the given Wikipedia page screenshot.",
    # visual grounding: crops of one object
    "MSCOCO": _CROP, "RefCOCO": _CROP, "Visual7W-Pointing": _CROP,
    "RefCOCO-Matching": "Represent the given cropped image of an object with its description.",
    # the built-in shapes world (rematch.data.shapes_tasks)
    "ShapesCLS": "Represent the given colour and shape label.",
    "ShapesVQA": "Represent the given answer to a question about shapes.",
    "ShapesT2I": _IMAGE,
    "ShapesI2T": "Represent the given image caption.",
    "ShapesGround": _CROP,
}


def resolved_table(config) -> dict[str, str]:
    """The complete table a model uses: ``config.document_instruction_table`` over the built-in one.

    A table that already holds the default key ``"*"`` is complete (a saved model's table),
    so it is used as it is and later changes of the built-in table cannot reach it.
    """
    own: Mapping[str, str] = config.document_instruction_table or {}
    if DEFAULT_KEY in own:
        return dict(own)
    return {**BUILTIN_DOCUMENT_INSTRUCTIONS, **own}


def document_instruction(subset: str | None, config) -> str | None:
    """The instruction a document of ``subset`` gets (None when the model uses none)."""
    if not config.document_instructions:
        return None
    table = resolved_table(config)
    return table.get(subset or DEFAULT_KEY, table[DEFAULT_KEY])


def document_items(items: Sequence[Item], subset: str | Sequence[str | None] | None, config) -> list[Item]:
    """``items`` with their subset's document instruction set where an item has none.

    ``subset`` is one name for all items or one name per item (a training batch mixes
    subsets). Items that carry an instruction keep it; with document instructions off the
    items come back unchanged.
    """
    items = list(items)
    if not config.document_instructions:
        return items
    subsets = [subset] * len(items) if subset is None or isinstance(subset, str) else list(subset)
    if len(subsets) != len(items):
        raise ValueError(f"got {len(subsets)} subset names for {len(items)} items")
    return [item if item.instruction else replace(item, instruction=document_instruction(name, config))
            for item, name in zip(items, subsets)]


def with_resolved_table(config):
    """``config`` with its document-instruction table made complete (what a model keeps and saves)."""
    if not config.document_instructions or DEFAULT_KEY in (config.document_instruction_table or {}):
        return config
    return replace(config, document_instruction_table=resolved_table(config))
