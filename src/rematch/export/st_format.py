"""``--format sentence-transformers``: the plain checkpoint plus what sentence-transformers reads.

``modules.json`` names one custom input module, ``rematch_sentence_transformers.ReMatchEmbedding``
(a file copied into the directory; it imports only its sibling ``rematch_embedding.py``,
torch, transformers and sentence-transformers), and ``config_sentence_transformers.json``
declares the query/document prompts (empty: ReMatch's roles are its tokens, not a prefix)
and cosine similarity.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MODULE_FILE = Path(__file__).with_name("standalone") / "rematch_sentence_transformers.py"
MODULE_CLASS = "rematch_sentence_transformers.ReMatchEmbedding"


def write_sentence_transformers_files(directory: Path) -> None:
    """Add the module file, ``modules.json`` and ``config_sentence_transformers.json`` to a plain export."""
    shutil.copyfile(MODULE_FILE, directory / MODULE_FILE.name)
    modules = [{"idx": 0, "name": "0", "path": "", "type": MODULE_CLASS}]
    (directory / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
    config = {
        "model_type": "SentenceTransformer",
        "__version__": _versions(),
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    (directory / "config_sentence_transformers.json").write_text(json.dumps(config, indent=2) + "\n",
                                                                  encoding="utf-8")


def _versions() -> dict[str, str]:
    """The library versions the directory was written with (sentence-transformers itself is optional here:
    writing the directory does not need it, loading it does)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for key, package in (("sentence_transformers", "sentence-transformers"), ("transformers", "transformers"),
                         ("pytorch", "torch")):
        try:
            found[key] = version(package)
        except PackageNotFoundError:
            continue
    return found
