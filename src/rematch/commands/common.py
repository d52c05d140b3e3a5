"""Helpers shared by the CLI command modules."""

from __future__ import annotations

import json
from pathlib import Path


def load_model(spec: str, device: str | None = None):
    """``tiny`` / ``tiny:small`` / ``tiny:small:qwen2_5_vl`` build offline; anything else is a path or hub id."""
    from rematch import ReMatchModel

    if spec.startswith("tiny"):
        parts = spec.split(":")
        size = parts[1] if len(parts) > 1 else "tiny"
        family = parts[2] if len(parts) > 2 else "qwen2_vl"
        model = ReMatchModel.tiny(size=size, backbone=family)
        return model.to(device) if device else model
    return ReMatchModel.from_pretrained(spec, device=device)


def read_jsonl(path: str | Path) -> list[dict]:
    """All rows of a jsonl file; a bad line is an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise SystemExit(f"{path}: line {number} is not valid JSON ({error})") from error
    return rows
