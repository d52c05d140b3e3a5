"""The shipped ``tiny-pretrained`` backbone: the tiny Qwen2-VL after generative pre-training.

A random tiny backbone cannot answer "Yes"/"No" about an image, so ReMatch's matching loss
had nothing to start from (issue 12). The package ships one pre-trained by
``rematch pretrain --config configs/pretrain-tiny.yaml`` (see docs/pretraining.md), in the
Hugging Face layout plus ``pretraining.json`` (recipe, seeds, corpus generator version,
sha256 of the weights, the first loss-curve rows). It loads offline, and its checksum is
verified on every load: a damaged or hand-edited file is an error, never silently
different weights.

Spec: ``model.backbone: tiny-pretrained`` in a recipe, ``--model.backbone tiny-pretrained``
on the command line, or ``ReMatchModel.tiny(pretrained=True)``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from rematch.atomic import sha256_of

#: The backbone spec that names the shipped model.
PRETRAINED_TINY = "tiny-pretrained"
RECORD_FILE = "pretraining.json"


class PretrainedAssetError(ValueError):
    """The shipped pre-trained backbone is missing, or its files do not match their checksums."""


def asset_dir() -> Path:
    """Where the package keeps the shipped backbone."""
    return Path(str(resources.files("rematch") / "assets" / PRETRAINED_TINY))


def read_record(directory: Path | None = None) -> dict[str, Any]:
    """``pretraining.json`` of a pre-trained backbone directory (default: the shipped one)."""
    directory = asset_dir() if directory is None else Path(directory)
    path = directory / RECORD_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PretrainedAssetError(f"{path} is missing: the package was installed without its pre-trained "
                                   "backbone (rebuild it: see docs/pretraining.md)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PretrainedAssetError(f"{path}: not valid JSON ({error})") from None


def verify_checksums(directory: Path | None = None) -> dict[str, Any]:
    """Check every file ``pretraining.json`` lists against its sha256; returns the record."""
    directory = asset_dir() if directory is None else Path(directory)
    record = read_record(directory)
    sums = record.get("sha256")
    if not isinstance(sums, dict) or not sums:
        raise PretrainedAssetError(f"{directory / RECORD_FILE}: no 'sha256' checksums recorded")
    for name, expected in sums.items():
        path = directory / name
        if not path.is_file():
            raise PretrainedAssetError(f"{path} is missing (listed in {RECORD_FILE})")
        actual = sha256_of(path)
        if actual != expected:
            raise PretrainedAssetError(f"{path}: sha256 {actual} differs from the recorded {expected}; the file is "
                                       "damaged or was changed (reinstall rematch, or rebuild: docs/pretraining.md)")
    return record
