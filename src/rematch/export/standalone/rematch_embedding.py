"""A ReMatch embedding from an exported checkpoint with plain ``transformers`` (no rematch).

``rematch export MODEL OUT --format transformers`` writes an ordinary Qwen2-VL / Qwen2.5-VL
checkpoint whose vocabulary holds the K learnable tokens of each role as added special
tokens (``<|emb_q_0|>`` ... for queries, ``<|emb_d_0|>`` ... for documents). Reproducing
the embedding takes three steps, all in :meth:`ExportedEmbedder.embed`:

1. the chat text: the instruction in the system turn, the image (one vision block) and text
   in the user turn, then the assistant turn opened and filled with the role's K tokens;
2. one forward of the language model (left padding, so the K tokens end every row);
3. the mean of the final hidden states at those K positions, L2-normalised.

This file is copied into every export and is self-contained on purpose: it imports only
torch, transformers and PIL.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.nn import functional as F
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

SETTINGS_NAME = "rematch_embedding.json"
PROJECTOR_NAME = "rematch_projector.safetensors"
#: The prompts a sentence-transformers export declares: markers that select the role (its K
#: tokens), never text the model reads -- ReMatch's roles are tokens, not prefixes.
ROLE_PROMPTS = {"query": "<|rematch:query|>", "document": "<|rematch:document|>"}
IMAGE_PAD = "<|image_pad|>"
VISION_BLOCK = f"<|vision_start|>{IMAGE_PAD}<|vision_end|>"
IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>|<image>")  # MMEB-style image marks inside a text


class ExportedEmbedder:
    """The exported model, its tokenizer and image processor, and the settings rematch encoded with."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        path = Path(path)
        self.settings: dict[str, Any] = json.loads((path / SETTINGS_NAME).read_text(encoding="utf-8"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or "auto").to(device).eval()
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def chat_text(self, item: dict, role: str) -> str:
        """Where everything goes: instruction -> system turn, image + text -> user turn, K tokens last."""
        settings = self.settings
        instruction = item.get("instruction") or (settings["document_instruction"] if role == "document" else None)
        system = self._truncate(instruction or settings["system_prompt"], settings["max_instruction_tokens"])
        content = self._truncate(item.get("text") or "", settings["max_text_tokens"])
        if item.get("image") is not None:
            has_mark = IMAGE_PLACEHOLDER.search(content)
            content = IMAGE_PLACEHOLDER.sub(VISION_BLOCK, content, count=1) if has_mark else VISION_BLOCK + content
        # Qwen3-VL's template writes no system turn for its default prompt (settings list it)
        head = "" if system in settings.get("no_system_turn_for", []) else f"<|im_start|>system\n{system}<|im_end|>\n"
        return (f"{head}<|im_start|>user\n{content}<|im_end|>\n"
                f"<|im_start|>assistant\n" + "".join(settings["role_tokens"][role]))

    @torch.inference_mode()
    def embed(self, items: Iterable[dict | str], role: str = "query") -> torch.Tensor:
        """Items (``{"text", "image", "instruction"}`` dicts or plain strings) -> (n, H) unit vectors."""
        return self.forward(self.prepare(items, role))

    def prepare(self, items: Iterable[dict | str], role: str = "query") -> dict[str, torch.Tensor]:
        """Chat texts -> a left-padded batch (the K role tokens end every row)."""
        if role not in self.settings["role_tokens"]:
            raise ValueError(f"role must be one of {sorted(self.settings['role_tokens'])}, got {role!r}")
        items = [{"text": item} if isinstance(item, str) else item for item in items]
        texts = [self.chat_text(item, role) for item in items]
        images = [_rgb(item["image"]) for item in items if item.get("image") is not None]
        inputs: dict[str, torch.Tensor] = {}
        if images:  # the processor's job, spelled out: each image becomes grid/merge^2 pad tokens
            vision = self.image_processor(images=images, return_tensors="pt")
            counts = iter((vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist())
            texts = [text.replace(IMAGE_PAD, IMAGE_PAD * next(counts)) if IMAGE_PAD in text else text
                     for text in texts]
            inputs.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
        tokens = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        inputs.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                      mm_token_type_ids=(tokens["input_ids"] == self.image_pad_id).int())
        return inputs

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One forward; the mean of the final states at the K role tokens, L2-normalised."""
        device = self.model.device
        hidden = self.model.model(**{name: value.to(device) for name, value in inputs.items()}).last_hidden_state
        k = self.settings["num_tokens"]
        states = hidden[:, -k:] if k else hidden[:, -1:]
        states = states.float()  # pooled in float32, as rematch does, whatever the model's dtype
        fused = states.mean(dim=1) if self.settings["pooling"] == "mean" else states[:, -1]
        return F.normalize(fused, dim=-1)

    def _truncate(self, text: str, limit: int) -> str:
        if not limit or len(text) <= limit:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= limit else self.tokenizer.decode(ids[:limit])


class Projector(torch.nn.Module):
    """The matching branch's projector: a unit embedding -> one soft input token (the mean of the
    training embeddings subtracted and renormalised where the model was trained so, an MLP,
    then a learned norm).

    Only reranking with the matching head uses it; the embedding itself never does."""

    def __init__(self, mlp: torch.nn.Sequential, center: torch.Tensor | None = None):
        super().__init__()
        self.mlp = mlp
        self.output_norm = torch.nn.Parameter(torch.tensor(1.0))
        self.center = center

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        embedding = embedding.float()
        if self.center is not None:
            embedding = F.normalize(embedding - self.center.to(embedding.device), dim=-1, eps=1e-6)
        return F.normalize(self.mlp(embedding), dim=-1, eps=1e-6) * self.output_norm


def load_projector(path: str | Path) -> Projector:
    """The projector saved beside an export (Linear, GELU, ..., Linear; every tensor of the file used)."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(path) / PROJECTOR_NAME))
    linears = sorted(int(name.split(".")[1]) for name in tensors if name.startswith("mlp.") and name.endswith("weight"))
    layers: list[torch.nn.Module] = []
    for position, index in enumerate(linears):
        out_features, in_features = tensors[f"mlp.{index}.weight"].shape
        layers.append(torch.nn.Linear(in_features, out_features))
        if position < len(linears) - 1:
            layers.append(torch.nn.GELU())
    center, updates = tensors.pop("center", None), tensors.pop("center_updates", None)
    # a centering projector that never saw a training batch has a zero center: no centering
    projector = Projector(torch.nn.Sequential(*layers), center if updates is not None and float(updates) > 0 else None)
    projector.load_state_dict(tensors)
    return projector.eval()


def _rgb(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as handle:
        return handle.convert("RGB")
