"""A model's short name: the hub id, or its directory's name, never a filesystem path.

Why: names leave the machine. A server reports the name it answers to, an mteb result is
filed under the model's name; a path (``/data/runs/rematch-2b/model``) says nothing about
the model and everything about the disk. ``RUN/model`` (where ``rematch train`` saves) is
named after its run.
"""

from __future__ import annotations

import os
from pathlib import Path

from rematch.hub.resolve import HUB_ID, RUN_MODEL_SUBDIR, is_local_spec


def short_name(spec: str | os.PathLike) -> str:
    """``org/name@rev`` -> ``org/name``; ``/data/rematch-2b`` -> ``rematch-2b``; ``runs/demo/model`` ->
    ``demo``; ``tiny:small`` and other specs stay as they are."""
    text = os.fspath(spec)
    if not is_local_spec(text):
        repo_id = text.split("@", 1)[0]
        return repo_id if HUB_ID.fullmatch(repo_id) else text
    path = Path(os.path.normpath(Path(text).expanduser().absolute()))
    name = path.name
    if name == RUN_MODEL_SUBDIR and path.parent.name:
        name = path.parent.name
    return name or text  # "/" has no name
