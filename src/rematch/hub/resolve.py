"""Where a model spec points: a local directory, or a snapshot of a Hugging Face hub repository.

Every loader turns its spec into a local directory here first, so a hub id runs exactly
the same directory-loading code as a path (before, ``from_pretrained("org/name")`` skipped
``rematch_config.json`` because it only looked on the local disk, and came back with
random heads).

A spec is a *local path* when it exists, starts with ``.``, ``/`` or ``~``, or its first
component exists (``runs/demo/modle``: ``runs`` is here, so this is a typo'd path, and it
fails at once naming the missing part instead of spending half a minute asking the hub).
Otherwise it must look like ``org/name`` (optionally ``org/name@revision``) and is fetched
with :func:`huggingface_hub.snapshot_download`, which serves it from the local cache when
it is there and ``HF_HUB_OFFLINE`` is set.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

#: What a hub repository id looks like: one "org/name" pair of safe characters.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")

#: Files a PyTorch model never needs: other frameworks' copies of the weights, which can
#: double or triple a download.
IGNORED_PATTERNS = ("*.onnx", "*.onnx_data", "onnx/*", "*.gguf", "*.msgpack", "*.h5", "*.tflite", "*.ot")

_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelNotFoundError(FileNotFoundError):
    """A model spec names no local directory and no hub repository that could be fetched."""


def is_local_spec(spec: str) -> bool:
    """Whether ``spec`` means a path on this machine (see the module docstring for the rule)."""
    if spec.startswith((".", "/", "~", "\\")) or os.path.isabs(spec):
        return True
    path = Path(spec)
    return path.exists() or (bool(path.parts) and Path(path.parts[0]).exists())


def resolve_model_dir(spec: str | os.PathLike, revision: str | None = None,
                      allow_patterns: Sequence[str] | None = None) -> Path:
    """The local directory ``spec`` names: the path itself, or the hub snapshot it resolves to.

    ``revision`` (a branch, tag or commit) applies to hub ids only; ``org/name@revision``
    says the same inside the spec. ``allow_patterns`` limits what a hub download fetches
    (e.g. only ``rematch_config.json`` to inspect a model).
    """
    text = os.fspath(spec)
    if is_local_spec(text):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub ids, but {text!r} is a local path")
        return _existing_directory(Path(text).expanduser())
    repo_id, spec_revision = _split_revision(text)
    if spec_revision is not None and revision is not None and spec_revision != revision:
        raise ValueError(f"{text!r} names revision {spec_revision!r} but revision={revision!r} was passed")
    if not HUB_ID.fullmatch(repo_id):
        raise ModelNotFoundError(f"no model directory at {text} (not a local path, and not a hub id of the "
                                 "form org/name)")
    return download_snapshot(repo_id, revision or spec_revision, allow_patterns)


def download_snapshot(repo_id: str, revision: str | None = None,
                      allow_patterns: Sequence[str] | None = None) -> Path:
    """The local snapshot directory of a hub model, downloaded unless the cache has it.

    ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` are read when called, not only when
    ``huggingface_hub`` was imported, so a process (a notebook, a test) that sets them
    later is obeyed.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, HfHubHTTPError

    offline = hub_offline()
    cache_dir = hub_cache_dir()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline,
                                   allow_patterns=list(allow_patterns) if allow_patterns else None,
                                   ignore_patterns=list(IGNORED_PATTERNS))
    except (HfHubHTTPError, EntryNotFoundError, HFValidationError) as error:
        where = f"{repo_id}" + (f"@{revision}" if revision else "")
        if offline:
            reason = f"it is not in the Hugging Face cache ({cache_dir or 'the default cache'}) and HF_HUB_OFFLINE " \
                     "is set"
        else:
            reason = _first_line(error)
        raise ModelNotFoundError(f"{where} is not a local directory, and the hub model could not be fetched: "
                                 f"{reason}") from error
    return Path(folder)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now; huggingface_hub's import-time value otherwise."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return value.strip().upper() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str | None:
    """``HF_HUB_CACHE`` (or ``HF_HOME``/hub) as set now; None lets huggingface_hub use its default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expandvars(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"])), "hub")
    return None


def _split_revision(text: str) -> tuple[str, str | None]:
    repo_id, at, revision = text.partition("@")
    if at and not revision:
        raise ValueError(f"{text!r}: nothing after '@' (expected org/name@revision)")
    return repo_id, (revision if at else None)


#: Where ``rematch train --out RUN`` saves the model: a run directory given as a model is pointed there.
RUN_MODEL_SUBDIR = "model"


def _existing_directory(path: Path) -> Path:
    if path.is_dir():
        _refuse_run_directory(path)
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file, not a model directory")
    existing = next((parent for parent in path.parents
                     if parent.exists() and str(parent) not in (".", parent.anchor)), None)
    hint = f" ({existing} exists, {path.relative_to(existing)} does not)" if existing is not None else ""
    raise ModelNotFoundError(f"no model directory at {path}{hint}")


def _refuse_run_directory(path: Path) -> None:
    """A training run directory is not a model, but its ``model/`` is: say so in one line.

    Why here: every command's ``--model`` goes through this function, and the loaders'
    own message ("neither rematch_config.json nor config.json") does not say where to look.
    """
    from rematch.saved_model import CONFIG_NAME

    inner = path / RUN_MODEL_SUBDIR
    if (path / CONFIG_NAME).is_file() or (path / "config.json").is_file() or not (inner / CONFIG_NAME).is_file():
        return
    raise ModelNotFoundError(f"{path} is a training run directory, not a model; its model is in {inner}: "
                             f"use --model {inner}")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
