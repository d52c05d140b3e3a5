"""rematch: multimodal retrieval with ReMatch on Qwen-VL backbones.

Quick start::

    from rematch import ReMatchModel
    model = ReMatchModel.tiny()                      # offline, random weights
    q = model.encode(["a red circle"], role="query")
    d = model.encode([{"image": "shape.png"}], role="document")
    scores = q @ d.T

The public names are loaded on first use (PEP 562): ``import rematch`` alone imports neither
torch nor transformers, so ``rematch --help`` and ``rematch info`` start in a fraction of a
second (benchmarks/bench_startup.py) and a submodule such as :mod:`rematch.config` can be used
without paying for the model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported when the name is first looked up).
_LAZY_NAMES = {
    "Config": "rematch.config",
    "ModelConfig": "rematch.config",
    "load_config": "rematch.config",
    "Item": "rematch.data.items",
    "ItemError": "rematch.data.items",
    "EmbeddingOutput": "rematch.model",
    "ReMatchModel": "rematch.model",
}

__all__ = ["Config", "EmbeddingOutput", "Item", "ItemError", "ModelConfig", "ReMatchModel", "load_config",
           "__version__"]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ below loads these
    from rematch.config import Config, ModelConfig, load_config
    from rematch.data.items import Item, ItemError
    from rematch.model import EmbeddingOutput, ReMatchModel


def __getattr__(name: str) -> Any:
    """``rematch.ReMatchModel`` and the other public names, imported on first access and cached
    in the module's namespace so later lookups are plain attribute reads."""
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'rematch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The lazy names too, so ``dir(rematch)`` and tab completion list them before first use."""
    return sorted(set(globals()) | set(__all__))
