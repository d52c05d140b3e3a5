"""rematch: multimodal retrieval with ReMatch on Qwen-VL backbones.

Quick start::

    from rematch import ReMatchModel
    model = ReMatchModel.tiny()                      # offline, random weights
    q = model.encode(["a red circle"], role="query")
    d = model.encode([{"image": "shape.png"}], role="document")
    scores = q @ d.T
"""

from rematch.config import Config, ModelConfig, load_config
from rematch.data.items import Item, ItemError
from rematch.model import EmbeddingOutput, ReMatchModel

__version__ = "0.1.0"

__all__ = ["Config", "EmbeddingOutput", "Item", "ItemError", "ModelConfig", "ReMatchModel", "load_config",
           "__version__"]
