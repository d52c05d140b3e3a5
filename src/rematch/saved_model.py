"""What a saved ReMatch model directory is, read without torch: file names, its metadata, its errors.

Why apart from :mod:`rematch.serialization`: ``rematch info``, the push staging and the model
card only need ``rematch_config.json``; serialization loads weights and so imports torch and
the backbones. Keeping the file's reader here lets light commands answer in a fraction of a
second (``benchmarks/bench_startup.py``) while loading and these commands read the file the
same way, with the same errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_NAME = "rematch_config.json"
HEADS_NAME = "rematch_heads.safetensors"
FORMAT_VERSION = 1
#: Fields of rematch_config.json that loading reads, with their JSON types.
META_FIELDS = {"model": dict, "model_type": str, "hidden_size": int}


#: The largest rematch_config.json read (a real one is a few KB).
MAX_CONFIG_BYTES = 1 << 20


def _no_constant(name: str):
    """``json.loads(parse_constant=...)``: NaN and Infinity are no configuration value (``rematch
    info`` printed them back, and loading would build a model from them)."""
    raise ValueError(f"holds {name}, which is not a valid value")


class CheckpointMismatchError(ValueError):
    """A saved model does not match what the caller asked for or what its files hold."""


class NotAReMatchModelError(CheckpointMismatchError):
    """A directory given to ``from_pretrained`` holds no saved ReMatch model (no rematch_config.json)."""


def read_rematch_meta(path: Path) -> dict[str, Any] | None:
    """``rematch_config.json`` of a model directory, checked (None when the directory has none)."""
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        return None
    size = config_file.stat().st_size
    if size > MAX_CONFIG_BYTES:  # a (sparse) multi-GB file would be read whole into memory
        raise CheckpointMismatchError(f"{config_file}: {size} bytes, far more than a model's configuration "
                                      f"(at most {MAX_CONFIG_BYTES}); the file is damaged, copy it again")
    try:
        meta = json.loads(config_file.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise CheckpointMismatchError(f"{config_file}: not valid JSON ({error})") from error
    except ValueError as error:  # NaN / Infinity (_no_constant)
        raise CheckpointMismatchError(f"{config_file}: {error}; the file is damaged, copy it again") from error
    if not isinstance(meta, dict):
        raise CheckpointMismatchError(f"{config_file}: expected a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{config_file}: format_version {version!r} is not supported "
                                      f"(this rematch reads version {FORMAT_VERSION})")
    for key, kind in META_FIELDS.items():  # what loading reads: a KeyError deep inside otherwise
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointMismatchError(f"{config_file}: field {key!r} is missing or not a {kind.__name__} "
                                          f"(got {value!r}); the file is damaged, copy it again from where "
                                          "the model was saved")
    return meta
