"""``--format sentence-transformers``: the plain checkpoint plus what sentence-transformers reads.

``modules.json`` names one custom input module, ``rematch_sentence_transformers.ReMatchEmbedding``
(a file copied into the directory; it imports only its sibling ``rematch_embedding.py``,
torch, transformers and sentence-transformers). ``config_sentence_transformers.json``
declares cosine similarity and the two prompts, ``query`` and ``document``, whose values
are role markers (``ROLE_PROMPTS``): sentence-transformers hands the module the prompt of
``prompt_name=`` (and of ``encode_query`` / ``encode_document``) but not always a task, so
the marker is what tells the module the role. With empty prompts, as before issue 25,
``encode(x, prompt_name="document")`` silently embedded a query. A plain ``encode`` embeds
queries without any ``default_prompt_name`` (the module's default role; setting one makes
sentence-transformers warn on every load). ``sentence_bert_config.json`` declares the
modalities (text, image, both), which mteb reads to run image tasks with the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rematch.export.standalone.rematch_embedding import ROLE_PROMPTS

MODULE_FILE = Path(__file__).with_name("standalone") / "rematch_sentence_transformers.py"
MODULE_CLASS = "rematch_sentence_transformers.ReMatchEmbedding"
MODULES_NAME = "modules.json"
SBERT_CONFIG_NAME = "sentence_bert_config.json"
#: sentence-transformers' modality_config format (tuple keys joined with "+"): one forward takes any of them.
MODALITY_CONFIG = {modality: {"method": "forward", "method_output_name": "sentence_embedding"}
                   for modality in ("text", "image", "image+text")}


def write_sentence_transformers_files(directory: Path) -> None:
    """Add the module file, ``modules.json`` and the two sentence-transformers configs to a plain export."""
    shutil.copyfile(MODULE_FILE, directory / MODULE_FILE.name)
    modules = [{"idx": 0, "name": "0", "path": "", "type": MODULE_CLASS}]
    (directory / MODULES_NAME).write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
    config = {
        "model_type": "SentenceTransformer",
        "__version__": _versions(),
        "prompts": dict(ROLE_PROMPTS),
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    (directory / "config_sentence_transformers.json").write_text(json.dumps(config, indent=2) + "\n",
                                                                  encoding="utf-8")
    sbert = {"modality_config": MODALITY_CONFIG, "module_output_name": "sentence_embedding"}
    (directory / SBERT_CONFIG_NAME).write_text(json.dumps(sbert, indent=2) + "\n", encoding="utf-8")


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
