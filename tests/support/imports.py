"""Importing optional packages that change the process environment on import, with it kept as it was.

Why: ``sentence_transformers`` sets ``KMP_*`` variables and ``mteb`` (through polars)
``_RJEM_MALLOC_CONF`` when first imported; the suite's leak check (tests/conftest.py) would
blame whichever test imported them first.
"""

from __future__ import annotations

import os

import pytest


def import_quietly(name: str, reason: str | None = None):
    """``pytest.importorskip(name)`` with ``os.environ`` restored afterwards."""
    before = dict(os.environ)
    try:
        return pytest.importorskip(name, reason=reason)
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)
