"""A sentence-transformers input module for an exported ReMatch model.

``SentenceTransformer(OUT, trust_remote_code=True)`` loads it from ``modules.json``; every
step of the embedding is the plain-transformers one in ``rematch_embedding.py`` beside it
(imported relatively, so this file needs neither rematch nor anything outside OUT).

* The role (query or document: its K learnable tokens, and the default document
  instruction for documents) comes from whichever sentence-transformers idiom says it:
  ``encode_query`` / ``encode_document``, ``encode(x, task="query"|"document")`` or
  ``encode(x, prompt_name="query"|"document")``. The export's prompts are role markers
  (``ROLE_PROMPTS``), so a prompt name reaches this module as its marker; a plain
  ``encode`` embeds queries. An explicit ``task`` wins.
* An input is a text, a PIL image, or a dict with ``text`` / ``image`` (a PIL image or a
  file path) / ``instruction``; any other ``prompt`` (a text of one's own) becomes the
  instruction of items that carry none -- ReMatch puts instructions in the system turn.
* The vectors are L2-normalised (cosine similarity).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from sentence_transformers.base.modules import InputModule

from .rematch_embedding import PROJECTOR_NAME, ROLE_PROMPTS, SETTINGS_NAME, ExportedEmbedder

ROLES = ("query", "document")
PROMPT_ROLES = {prompt: role for role, prompt in ROLE_PROMPTS.items()}
ITEM_KEYS = {"text", "image", "instruction"}
CODE_FILES = ("rematch_embedding.py", "rematch_sentence_transformers.py")
#: Files of the export that describe it to other tools (mteb reads the modalities there); copied as they are.
DESCRIPTION_FILES = ("sentence_bert_config.json",)


class ReMatchEmbedding(InputModule):
    """The whole exported model as one input module: preprocess = chat text + batch, forward = fused vector."""

    save_in_root = True

    def __init__(self, model_name_or_path: str, **kwargs):
        super().__init__()
        self.source = Path(model_name_or_path)
        self.embedder = ExportedEmbedder(self.source)
        self.auto_model = self.embedder.model  # a registered child, so SentenceTransformer.to(device) moves it
        self.tokenizer = self.embedder.tokenizer

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
             local_files_only: bool = False, **kwargs) -> "ReMatchEmbedding":
        directory = cls.load_dir_path(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                      revision=revision, local_files_only=local_files_only)
        return cls(directory)

    @property
    def modalities(self) -> list:
        # "message" admits batches that mix texts and images; message-format inputs themselves are refused
        return ["text", "image", ("image", "text"), "message"]

    def preprocess(self, inputs: list, prompt: str | None = None, task: str | None = None,
                   **kwargs) -> dict[str, torch.Tensor]:
        role = task or PROMPT_ROLES.get(prompt or "") or "query"
        if role not in ROLES:
            raise ValueError(f"task must be one of {ROLES} (encode_query / encode_document), got {task!r}")
        instruction = None if prompt in PROMPT_ROLES else prompt
        items = [self._item(value, index, instruction) for index, value in enumerate(inputs)]
        return self.embedder.prepare(items, role)

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        inputs = {name: features[name] for name in ("input_ids", "attention_mask", "mm_token_type_ids",
                                                    "pixel_values", "image_grid_thw") if name in features}
        features["sentence_embedding"] = self.embedder.forward(inputs)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return int(self.embedder.settings["hidden_size"])

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        output = Path(output_path)
        self.auto_model.save_pretrained(output, safe_serialization=safe_serialization)
        self.tokenizer.save_pretrained(output)
        self.embedder.image_processor.save_pretrained(output)
        (output / SETTINGS_NAME).write_text(json.dumps(self.embedder.settings, indent=2) + "\n", encoding="utf-8")
        for name in (PROJECTOR_NAME, *CODE_FILES, *DESCRIPTION_FILES):
            if (self.source / name).is_file() and (self.source / name).resolve() != (output / name).resolve():
                shutil.copyfile(self.source / name, output / name)

    @staticmethod
    def _item(value: Any, index: int, prompt: str | None) -> dict:
        from PIL import Image

        if isinstance(value, str):
            item = {"text": value}
        elif isinstance(value, Image.Image):
            item = {"image": value}
        elif isinstance(value, dict):
            unknown = sorted(set(value) - ITEM_KEYS)
            if unknown:
                raise ValueError(f"input {index}: unknown field(s) {unknown}; an item has {sorted(ITEM_KEYS)}")
            item = dict(value)
        else:
            raise ValueError(f"input {index}: expected a text, a PIL image or a dict with {sorted(ITEM_KEYS)}, "
                             f"got {type(value).__name__}")
        if prompt and not item.get("instruction"):
            item["instruction"] = prompt
        return item

