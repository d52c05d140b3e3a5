"""Helpers shared by the CLI command modules."""

from __future__ import annotations

from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """All rows of a jsonl file; a bad line stops the command with the file and line named."""
    from rematch.retrieval.corpus import CorpusError, json_object

    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json_object(line, f"{path} line {number}"))
                except CorpusError as error:
                    raise SystemExit(str(error)) from error
    return rows
