"""Sharing a ReMatch model: hub cards and push, and exports that run without rematch.

* :mod:`rematch.hub.card` -- the README.md model card (front matter, usage, recipe, scores);
* :mod:`rematch.hub.push` -- stage a model folder with its card, upload it (``rematch push``);
* :mod:`rematch.export.fold` -- the learnable tokens folded into the vocabulary of a plain
  Qwen-VL checkpoint (``rematch export --format transformers``);
* :mod:`rematch.export.st_format` -- the sentence-transformers directory on top of it;
* :mod:`rematch.export.standalone` -- the files copied into exports (no rematch imports).
"""

from __future__ import annotations

from rematch.export.exporter import EXPORT_FORMATS, export_model

__all__ = ["EXPORT_FORMATS", "export_model"]
