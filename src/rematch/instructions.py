"""Target-side (document) instructions: what the document side of each task is asked to represent.

MMEB writes the query's instruction into the query text ("Represent the given image with
the following question: ...") but gives the targets none, so a plain VLM2Vec-style model
embeds the label "tench", the answer "two" and a news photo with the same prompt. B3 and
VLM2Vec-V2 give the target side an instruction of its own; the ReMatch paper's ablation
credits it with +1.8 MMEB (65.5 -> 67.3). Two styles (``ModelConfig.target_prompt_style``):

* ``"b3"`` (the default of new models and of the recipes): B3's public recipe. A document
  that is text only gets an inline prefix by its subset's category, "Represent the class
  label: " (classification), "Represent the answer: " (VQA), "Represent the image caption: "
  (retrieval); a document with an image or a video gets none (grounding targets are images);
  a subset of no known category gets none. The prefix is part of the text, not a system turn,
  exactly as B3 writes it, in training batches and in evaluation alike.
* ``"system"``: this project's first table. Every document that carries no instruction of its
  own gets its subset's sentence ("Represent the given class label for image
  classification.", "Represent the given news image.", ...) or the default one (key ``"*"``)
  in the system turn of the chat (see :mod:`rematch.backbones.qwen_vl`);
  ``ModelConfig.document_instruction_table`` adds or replaces entries, and a saved model
  stores the *resolved* table (:func:`resolved_table`) in ``rematch_config.json`` so it keeps
  encoding documents the way it was trained. Models saved before the styles existed load as
  ``"system"`` (``config.SAVED_BEFORE``).

Either way:

* the rule reaches every document: training positives and negatives
  (``rematch.training.collate`` calls :func:`document_items`), evaluation candidates,
  corpus items encoded with ``role="document"``, mined candidates;
* ``ModelConfig.document_instructions: false`` switches target instructions off (the
  VLM2Vec-style baseline), so that baseline and "+ target instruction" differ in both styles;
* a document that carries an instruction of its own keeps it and gets no prefix
  (:func:`as_written` uses this to hand the MMEB-V2 candidates to the model as the official
  harness writes them).

The "system" sentences below were written for this project in the style of those papers:
short, naming what the document is (a class label, an answer, a caption, an image...),
never the task's answer. The "b3" prefixes are B3's, verbatim.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

from rematch.data.items import Item
from rematch.data.mmeb_subsets import CLASSIFICATION, GROUNDING, RETRIEVAL, VQA, subset_info

#: Key of the instruction for documents of subsets the table does not name.
DEFAULT_KEY = "*"

#: B3's inline prefixes of text-only targets, by category (grounding targets are images: none).
B3_PREFIXES: dict[str, str] = {
    CLASSIFICATION: "Represent the class label: ",
    VQA: "Represent the answer: ",
    RETRIEVAL: "Represent the image caption: ",
}
#: Categories of the built-in shapes world's subsets (rematch.world.tasks), which MMEB's table
#: does not name (the world's manifest declares them to its data readers).
_WORLD_CATEGORIES = {"ShapesCLS": CLASSIFICATION, "ShapesVQA": VQA, "ShapesT2I": RETRIEVAL,
                     "ShapesI2T": RETRIEVAL, "ShapesGround": GROUNDING}

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
    # the built-in shapes world (rematch.world.tasks)
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


def style_of(config) -> str:
    """The target prompt style of ``config`` ("system" for a config object from before styles existed)."""
    return getattr(config, "target_prompt_style", "system")


def document_instruction(subset: str | None, config) -> str | None:
    """The system-turn instruction a document of ``subset`` gets (None when the model uses none:
    document instructions off, or the "b3" style, which writes prefixes instead)."""
    if not config.document_instructions or style_of(config) != "system":
        return None
    table = resolved_table(config)
    return table.get(subset or DEFAULT_KEY, table[DEFAULT_KEY])


def subset_category(subset: str | None) -> str | None:
    """The category of ``subset`` that picks its B3 prefix (MMEB's table, then the shapes world's)."""
    if not subset:
        return None
    category = subset_info(subset).meta_task
    return category if category in (CLASSIFICATION, VQA, RETRIEVAL, GROUNDING) else _WORLD_CATEGORIES.get(subset)


def b3_prefix(subset: str | None) -> str | None:
    """B3's inline prefix of a text-only document of ``subset`` (None for grounding and unknown subsets)."""
    return B3_PREFIXES.get(subset_category(subset))


def _b3_document(item: Item, subset: str | None) -> Item:
    """``item`` with B3's prefix on its text, if it is a text-only document without an instruction."""
    prefix = b3_prefix(subset)
    if prefix is None or item.instruction or item.has_visual or not item.text or item.text.startswith(prefix):
        return item
    return replace(item, text=prefix + item.text)


def document_items(items: Sequence[Item], subset: str | Sequence[str | None] | None, config) -> list[Item]:
    """``items`` as documents of ``subset`` under the model's target prompt style.

    "system": the subset's document instruction set where an item has none. "b3": B3's
    prefix by category on text-only items without an instruction (applying it twice adds it
    once). ``subset`` is one name for all items or one name per item (a training batch mixes
    subsets). Items that carry an instruction keep it; with document instructions off the
    items come back unchanged.
    """
    items = list(items)
    if not config.document_instructions:
        return items
    subsets = [subset] * len(items) if subset is None or isinstance(subset, str) else list(subset)
    if len(subsets) != len(items):
        raise ValueError(f"got {len(subsets)} subset names for {len(items)} items")
    if style_of(config) == "b3":
        return [_b3_document(item, name) for item, name in zip(items, subsets)]
    return [item if item.instruction else replace(item, instruction=document_instruction(name, config))
            for item, name in zip(items, subsets)]


def as_written(items: Sequence[Item], config) -> list[Item]:
    """Documents the model must encode exactly as written: no target instruction, in either style.

    Why: the official MMEB-V2 harness gives its candidates their own text ("Understand the
    content of the provided video.", or a bare class label) and nothing else. An item without
    an instruction would get the model's target instruction on its way in
    (``ReMatchModel.prepare`` applies :func:`document_items`), so such items are given the
    model's default system prompt as their instruction: that is the system turn an item
    without one gets anyway (Qwen2-VL writes it, Qwen3-VL's rule writes none for it), and an
    item with an instruction is left alone by both styles.
    """
    return [item if item.instruction else replace(item, instruction=config.system_prompt) for item in items]


def with_resolved_table(config):
    """``config`` with its document-instruction table made complete (what a model keeps and saves;
    only the "system" style reads it, so a "b3" config is kept as it is)."""
    if (not config.document_instructions or style_of(config) != "system"
            or DEFAULT_KEY in (config.document_instruction_table or {})):
        return config
    return replace(config, document_instruction_table=resolved_table(config))
