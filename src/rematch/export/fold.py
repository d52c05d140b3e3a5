"""``--format transformers``: a ReMatch model as an ordinary Qwen2-VL / Qwen2.5-VL checkpoint.

The learnable tokens of each role become added special tokens of the vocabulary
(``<|emb_q_0|>`` ... ``<|emb_q_{K-1}|>`` for queries, ``<|emb_d_*|>`` for documents) whose
embedding rows are the learned vectors, and LoRA adapters are merged, so any runtime
that loads a Qwen-VL checkpoint loads the export without rematch. What rematch adds at
encoding time -- the chat format, the K tokens at the end, the mean of their final states
-- is written down in ``rematch_embedding.py`` (copied into the export, see
:mod:`rematch.export.standalone.rematch_embedding`) and the settings it reads,
``rematch_embedding.json``. The projector, used only by the matching (reranking) branch,
is saved beside it as ``rematch_projector.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from rematch.export.standalone import rematch_embedding as standalone

SETTINGS_NAME = standalone.SETTINGS_NAME
PROJECTOR_NAME = standalone.PROJECTOR_NAME
EMBEDDING_FILE = Path(standalone.__file__)
ROLE_PREFIXES = {"query": "q", "document": "d"}
SETTINGS_FORMAT = "rematch-embedding"
SETTINGS_VERSION = 1


class ExportError(ValueError):
    """A model cannot be exported as asked (e.g. its vocabulary already uses the token names)."""


def role_token_names(num_tokens: int) -> dict[str, list[str]]:
    """The added special tokens that stand for the learnable tokens, per role."""
    return {role: [f"<|emb_{prefix}_{index}|>" for index in range(num_tokens)]
            for role, prefix in ROLE_PREFIXES.items()}


def embedding_settings(model, role_tokens: dict[str, list[str]]) -> dict[str, Any]:
    """Everything the plain-transformers lines need besides the weights, as rematch encoded."""
    from rematch.instructions import DEFAULT_KEY, resolved_table

    config = model.config
    style = getattr(config, "target_prompt_style", "system")
    # the plain lines know no subsets: the "system" style's default sentence is what a document gets
    # there; the "b3" style puts a prefix only on documents of a known subset, so there it gets none
    table = resolved_table(config) if config.document_instructions and style == "system" else {}
    return {
        "format": SETTINGS_FORMAT,
        "format_version": SETTINGS_VERSION,
        "model_type": model._causal_lm().config.model_type,
        "hidden_size": model.hidden_size,
        "num_tokens": model.num_tokens,
        "pooling": config.pooling,
        "role_tokens": role_tokens,
        "system_prompt": config.system_prompt,
        # Qwen3-VL's chat template writes no system turn for the default prompt (rematch.backbones.qwen3_vl)
        "no_system_turn_for": ([type(config).system_prompt]
                               if getattr(model.adapter, "prompt_format", None) == "qwen3-template-system-turn"
                               else []),
        "document_instruction": table.get(DEFAULT_KEY),
        "document_instruction_table": table,
        "target_prompt_style": style,
        "max_text_tokens": config.max_text_tokens,
        "max_instruction_tokens": config.max_instruction_tokens,
        "min_pixels": config.min_pixels,
        "max_pixels": config.max_pixels,
        "matching_instruction": config.matching_instruction,
        "projector_layers": config.projector_layers,
        "similarity": "cosine (the vectors are L2-normalised)",
        "rematch_config": dataclasses.asdict(config),
    }


def write_transformers_checkpoint(model, directory: Path) -> dict[str, Any]:
    """Write the plain checkpoint into ``directory`` (an empty staging folder); returns the settings.

    LoRA adapters are merged into ``model`` first (in place: its embeddings stay the same,
    as ``merge-lora`` does). Nothing else of ``model`` changes: the tokens are added to a
    copy of the tokenizer read back from ``directory`` and the larger embedding table only
    exists in the state dict that is written.
    """
    from transformers import AddedToken, AutoTokenizer

    if hasattr(model.backbone, "peft_config"):
        model.merge_lora()
    backbone = model._causal_lm()
    names = role_token_names(model.num_tokens)
    model.processor.save_pretrained(directory)  # tokenizer + preprocessor_config.json (the model's pixel limits)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    all_names = names["query"] + names["document"]
    taken = sorted(set(all_names) & set(tokenizer.get_vocab()))
    if taken:
        raise ExportError(f"the tokenizer already has token(s) {taken[:3]}: this model was exported before, or "
                          "its vocabulary uses rematch's token names; export the original ReMatch model")
    tokenizer.add_tokens([AddedToken(name, special=True, normalized=False) for name in all_names],
                         special_tokens=True)
    tokenizer.save_pretrained(directory)
    ids = tokenizer.convert_tokens_to_ids(all_names)
    if len(set(ids)) != len(ids) or any(tokenizer.convert_ids_to_tokens(i) != n for i, n in zip(ids, all_names)):
        raise ExportError("the added role tokens did not get distinct ids in the tokenizer")
    vectors = torch.cat([model.query_tokens, model.document_tokens]).detach()
    _save_weights(backbone, directory, ids, vectors)
    settings = embedding_settings(model, names)
    (directory / SETTINGS_NAME).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    projector = {name: tensor.detach().float().cpu().contiguous() for name, tensor in model.projector.state_dict().items()}
    save_file(projector, str(directory / PROJECTOR_NAME), metadata={"format": "pt"})
    shutil.copyfile(EMBEDDING_FILE, directory / EMBEDDING_FILE.name)
    return settings


def _save_weights(backbone, directory: Path, ids: list[int], vectors: torch.Tensor) -> None:
    """``backbone.save_pretrained`` with the role tokens' rows set (the table grown if they do not fit)."""
    input_weight = backbone.get_input_embeddings().weight
    output_weight = backbone.get_output_embeddings().weight
    tied = output_weight.data_ptr() == input_weight.data_ptr()
    rows = input_weight.shape[0]
    needed = max(ids, default=-1) + 1  # K = 0: nothing to add
    new_rows = rows if needed <= rows else 64 * math.ceil(needed / 64)  # checkpoints pad the table to 64s

    def grown(weight: torch.Tensor, fill: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        weight = weight.detach()
        if new_rows == rows:
            return weight.clone()
        extra = fill(weight).expand(new_rows - rows, -1).to(weight.dtype)
        return torch.cat([weight, extra])

    mean_row = lambda weight: weight.float().mean(dim=0, keepdim=True)  # noqa: E731 - a neutral row
    new_input = grown(input_weight, mean_row)
    new_input[ids] = vectors.to(new_input.device, new_input.dtype)
    new_output = new_input if tied else grown(output_weight, mean_row)
    state = backbone.state_dict()
    for name, tensor in list(state.items()):
        if tensor.data_ptr() == input_weight.data_ptr():
            state[name] = new_input
        elif tensor.data_ptr() == output_weight.data_ptr():
            state[name] = new_output
    text_config = getattr(backbone.config, "text_config", backbone.config)
    configs = [config for config in (backbone.config, text_config) if hasattr(config, "vocab_size")]
    saved = [config.vocab_size for config in configs]
    try:
        for config in configs:
            config.vocab_size = new_rows
        backbone.save_pretrained(directory, state_dict=state)
    finally:
        for config, value in zip(configs, saved):
            config.vocab_size = value
