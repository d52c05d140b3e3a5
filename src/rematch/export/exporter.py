"""``rematch export``: a ReMatch model as a directory that runs without rematch.

Two formats, one fold (see :mod:`rematch.export.fold`):

* ``transformers``: an ordinary Qwen2-VL / Qwen2.5-VL checkpoint with the learnable tokens
  in its vocabulary, ``rematch_embedding.json`` (the settings rematch encoded with),
  ``rematch_embedding.py`` (the few lines that reproduce the embedding) and the projector;
* ``sentence-transformers``: the same, plus a custom module, so that
  ``SentenceTransformer(OUT, trust_remote_code=True)`` loads it.

Each is written to a temporary sibling and renamed into place, with a model card.
"""

from __future__ import annotations

import os
from pathlib import Path

from rematch.atomic import write_directory_atomically
from rematch.evaluation.report import read_eval_table
from rematch.hub.card import CARD_NAME, model_card_for
from rematch.export.fold import SETTINGS_NAME, write_transformers_checkpoint

EXPORT_FORMATS = ("transformers", "sentence-transformers")


def export_model(model, out: str | os.PathLike, output_format: str = "transformers", *, overwrite: bool = False,
                 model_dir: str | os.PathLike | None = None, eval_dir: str | os.PathLike | None = None,
                 allow_untrained: bool = False) -> Path:
    """Write ``model`` to ``out`` in ``output_format``; returns ``out``.

    A model with LoRA adapters has them merged (in place). ``model_dir`` (where the model was
    loaded from) lends the card its training recipe, ``eval_dir`` its evaluation table.
    An untrained model (random ReMatch heads) is refused unless ``allow_untrained``.
    """
    if output_format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {output_format!r}")
    if model.is_untrained() and not allow_untrained:
        raise ValueError("this model's ReMatch heads are untrained (random), so an export would embed "
                         "meaninglessly; export a trained model, or pass allow_untrained=True (--allow-untrained)")
    table = read_eval_table(eval_dir, model.fingerprint()) if eval_dir is not None else None
    card = model_card_for(model, output_format=output_format, model_dir=model_dir, eval_table=table)
    out = Path(out)

    def write(directory: Path) -> None:
        write_transformers_checkpoint(model, directory)
        if output_format == "sentence-transformers":
            from rematch.export.st_format import write_sentence_transformers_files

            write_sentence_transformers_files(directory)
        (directory / CARD_NAME).write_text(card, encoding="utf-8")

    write_directory_atomically(out, write, is_ours=lambda target: (target / SETTINGS_NAME).is_file(),
                               what="an exported ReMatch model", overwrite=overwrite)
    return out
