"""Helpers shared by the CLI command modules."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """All rows of a jsonl file; a bad line is a :class:`CorpusError` naming the file and line,
    and a file without any row is one too (it would give an empty result, silently)."""
    from rematch.retrieval.corpus import CorpusError, iter_jsonl

    rows = [row for _, row in iter_jsonl(path)]  # CorpusError: one line, via rematch.cli
    if not rows:
        raise CorpusError(f"{path}: no rows (the file is empty or blank)")
    return rows


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size of 0 once gave all-zero vectors, silently)."""
    return _bounded(text, int, 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (0 usually means "off")."""
    return _bounded(text, int, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _bounded(text, float, 0.0, "a finite number > 0")
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _bounded(text: str, kind, low, expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if (kind is float and not math.isfinite(value)) or value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value
