"""A ReMatch model as an mteb encoder: text, images or both, queries and documents, with its ModelMeta.

Why: ``mteb.get_model(export_dir)`` finds no implementation for a ReMatch model, and wrapping
the sentence-transformers export by hand gives mteb a text-only model (it reads modalities
from the hub only), so image tasks were refused. This wrapper runs ``ReMatchModel.encode``
itself:

* ``prompt_type`` picks the role: mteb's document side is ReMatch's ``document`` role (its
  own learnable tokens), everything else (queries, and the single side of classification,
  clustering, STS) is ``query``;
* instructions: an item's own (mteb's ``instruction`` column) first; else, for queries and
  single-sided tasks, the task's instruction from mteb's task metadata (its ``prompt``, or
  the task type's default), as ReMatch puts instructions in the system turn; documents keep
  ReMatch's own document instruction unless the task gives a document prompt;
* a batch's ``text`` (or ``query`` where mteb also gives the bare query) and ``image``
  columns become one item each; audio and video are refused with the task named.

    from rematch.integrations.mteb import load_encoder
    encoder = load_encoder("runs/demo/runs/full/seed0/model")
    mteb.evaluate(encoder, mteb.get_tasks(["MockAny2AnyRetrievalT2I"]), cache=None)
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from rematch.hub.names import short_name
from rematch.hub.resolve import HUB_ID

CITATION = """@misc{rematch2025,
  title={ReMatch: learnable embedding tokens and generative matching for multimodal retrieval},
  year={2025},
  eprint={2511.19278},
  archivePrefix={arXiv}
}"""
#: mteb batch columns rematch cannot embed.
UNSUPPORTED_COLUMNS = ("audio", "video")


class ReMatchEncoder(AbsEncoder):
    """mteb's encoder protocol over a :class:`~rematch.model.ReMatchModel` (see the module docstring)."""

    def __init__(self, model_name: str, revision: str | None = None, *, device: str | None = None, model=None,
                 batch_size: int = 16, **kwargs: Any):
        if kwargs:
            raise TypeError(f"ReMatchEncoder got unexpected keyword argument(s) {sorted(kwargs)}")
        if model is None:
            from rematch.model import ReMatchModel

            model = ReMatchModel.load(model_name, device)
        self.model = model
        self.batch_size = batch_size
        self.mteb_model_meta = model_meta(model, model_name)

    def encode(self, inputs: Iterable[Mapping[str, list]], *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        role = "document" if prompt_type == PromptType.document else "query"
        instruction = self.task_instruction(task_metadata, prompt_type)
        batch_size = int(kwargs.get("batch_size") or self.batch_size)
        vectors = [self.model.encode(batch_items(batch, instruction, task_metadata.name), role=role,
                                     batch_size=batch_size) for batch in inputs]
        return np.concatenate(vectors) if vectors else np.zeros((0, self.model.hidden_size), dtype=np.float32)

    def task_instruction(self, task_metadata, prompt_type: PromptType | None) -> str | None:
        """The instruction mteb's metadata gives this task for this side (None: ReMatch's own default)."""
        if prompt_type == PromptType.document:
            prompt = task_metadata.prompt
            return (prompt.get(PromptType.document.value) or None) if isinstance(prompt, dict) else None
        return self.get_instruction(task_metadata, prompt_type) or None


def batch_items(batch: Mapping[str, list], instruction: str | None, task: str = "this task") -> list[dict]:
    """One mteb batch -> ReMatch items (``text``, ``image``, ``instruction``)."""
    unsupported = [name for name in UNSUPPORTED_COLUMNS if name in batch]
    if unsupported:
        raise ValueError(f"{task}: rematch embeds text and images, not {' or '.join(unsupported)}")
    texts = batch.get("query", batch.get("text"))
    images = batch.get("image")
    own = batch.get("instruction")
    count = len(texts) if texts is not None else len(images) if images is not None else 0
    items = []
    for position in range(count):
        text = texts[position] if texts is not None else None
        image = images[position] if images is not None else None
        item_instruction = own[position] if own is not None and own[position] else instruction
        item = {"text": text if isinstance(text, str) and text.strip() else None, "image": image,
                "instruction": item_instruction}
        items.append({key: value for key, value in item.items() if value is not None})
    return items


def model_meta(model, spec: str | os.PathLike) -> ModelMeta:
    """mteb's description of ``model`` (loaded from ``spec``): image + text, cosine, instructions, its
    fingerprint as the revision (results are filed under it)."""
    name = short_name(spec)
    backbone = str(model.config.backbone)
    return ModelMeta(
        loader=ReMatchEncoder, name=name if "/" in name else f"rematch/{name}", revision=model.fingerprint(),
        release_date=None, languages=None, n_parameters=sum(parameter.numel() for parameter in model.parameters()),
        memory_usage_mb=None, max_tokens=float(model.config.max_text_tokens), embed_dim=model.hidden_size,
        license=None, open_weights=True, public_training_code=None, public_training_data=None,
        framework=["PyTorch", "Transformers"], similarity_fn_name=ScoringFunction.COSINE, use_instructions=True,
        training_datasets=None, modalities=["image", "text"], model_type=["dense"], citation=CITATION,
        adapted_from=backbone if HUB_ID.fullmatch(backbone.split("@", 1)[0]) else None)


def load_encoder(spec: str, device: str | None = None, batch_size: int = 16, model=None) -> ReMatchEncoder:
    """The mteb encoder of the model ``spec`` names (a directory, hub id or ``tiny``), or of ``model``."""
    return ReMatchEncoder(spec, device=device, model=model, batch_size=batch_size)
