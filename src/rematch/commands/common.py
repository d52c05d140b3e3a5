"""Helpers shared by the CLI command modules."""

from __future__ import annotations

import json
from pathlib import Path


def load_model(spec: str, device: str | None = None):
    """``tiny[:size[:family]]`` builds offline; anything else is a model directory or hub id."""
    from rematch import ReMatchModel

    return ReMatchModel.load(spec, device)


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
