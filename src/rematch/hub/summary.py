"""A saved model in a dozen lines: what ``rematch info`` prints (``--json`` prints the whole file).

Why: ``rematch_config.json`` is about 80 lines, most of them the document-instruction
table, and a reader wants a few facts first: what the model was fine-tuned from, whether
its heads were trained, the embedding's size and pooling, the input limits it was saved
with and how it treats documents. Reads only the checked ``rematch_config.json`` contents
(no torch), so ``info`` stays instant.
"""

from __future__ import annotations

from typing import Any, Mapping

TARGET_STYLES = {"b3": "B3's inline prefixes on text-only documents, by subset category",
                 "system": "a system-turn sentence per subset"}


def summary_lines(meta: Mapping[str, Any], where: str) -> list[str]:
    """``(label, value)`` lines describing the model whose ``rematch_config.json`` is ``meta``."""
    config: Mapping[str, Any] = meta.get("model") or {}
    family = meta.get("model_type") or config.get("tiny_family") or "?"
    k = meta.get("num_tokens", config.get("num_tokens"))
    untrained = bool(meta.get("untrained"))
    backbone = str(config.get("backbone") or "?")
    relation = "on" if untrained else "fine-tuned from"
    pooling = (f"mean of the final states of K={k} learnable tokens per role" if k else "the last token's final state")
    roles = ", ".join(meta.get("roles") or ("query", "document"))
    rows = [
        ("model", where),
        ("backbone", f"{relation} {backbone} ({family})"),
        ("heads", "untrained (random): embeddings are meaningless; for tests and timings only" if untrained
         else "trained"),
        ("embedding", f"{meta.get('hidden_size', '?')}-d, {pooling} ({roles}), L2-normalised, cosine"),
        ("adapters", "LoRA (loads its base model, checked by fingerprint)" if meta.get("peft") else "none (full weights)"),
        ("images", f"{config.get('min_pixels', '?'):,} to {config.get('max_pixels', '?'):,} pixels"
         if isinstance(config.get("max_pixels"), int) and isinstance(config.get("min_pixels"), int) else "?"),
        ("video", f"{config.get('video_fps', '?')} frames/s, at most {config.get('video_max_frames', '?')} frames"),
        ("text", f"at most {config.get('max_text_tokens', '?')} tokens, instructions "
                 f"{config.get('max_instruction_tokens', '?')}"),
        ("documents", _documents(config)),
        ("dtype", f"{config.get('dtype', '?')}, attention {config.get('attn_implementation', '?')}"),
    ]
    width = max(len(label) for label, _ in rows)
    return [f"{label:<{width}}  {value}" for label, value in rows] + ["(rematch info --json prints the whole "
                                                                       "rematch_config.json)"]


def _documents(config: Mapping[str, Any]) -> str:
    if config.get("document_instructions") is False:
        return "no document instructions (the VLM2Vec-style baseline)"
    style = str(config.get("target_prompt_style") or "system")
    text = f"target prompts {style}: {TARGET_STYLES.get(style, style)}"
    table = config.get("document_instruction_table") or {}
    if style == "system" and table:
        text += f" ({len(table)} entries of one's own)"
    return text
