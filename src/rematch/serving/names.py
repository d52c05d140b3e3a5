"""The names a server answers to: what clients put in ``model`` and read back in answers.

Why not the ``--model`` spec itself: a spec is often a filesystem path
(``/data/runs/rematch-2b/model``), so a client that copied an example with
``model="rematch"`` got a 404 naming the server's disk layout. vLLM's convention is a name
plus aliases (``--served-model-name NAME [ALIAS ...]``): the served name here defaults to
the model's short name (:func:`rematch.hub.names.short_name`: the hub id, or the model
directory's name, its run's name for ``RUN/model``), and ``rematch`` is always accepted as
well, so the documented examples run as written.
"""

from __future__ import annotations

import os

from rematch.hub.names import short_name

#: Accepted as ``model`` by every server, whatever it serves (the name the docs' examples use).
GENERIC_NAME = "rematch"


def served_names(spec: str | os.PathLike, given: list[str] | None = None) -> tuple[str, tuple[str, ...]]:
    """(the served name, the other accepted names): ``given`` (``--served-model-name``) or the model's
    short name, with :data:`GENERIC_NAME` always accepted."""
    names = list(given) if given else [short_name(spec)]
    aliases = tuple(dict.fromkeys(name for name in (*names[1:], GENERIC_NAME) if name != names[0]))
    return names[0], aliases
