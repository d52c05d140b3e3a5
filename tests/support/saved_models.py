"""Model directories as older rematch versions wrote them, for the tests that load them."""

from __future__ import annotations

import json
from pathlib import Path


def save_as_before(model, directory: Path, field: str) -> Path:
    """Save ``model`` to ``directory`` as a version before ``model.<field>`` existed wrote it
    (the field missing from ``rematch_config.json``); returns the directory."""
    model.save_pretrained(directory)
    path = directory / "rematch_config.json"
    meta = json.loads(path.read_text())
    del meta["model"][field]
    path.write_text(json.dumps(meta))
    return directory
