"""``rematch export``: a ReMatch model as a directory that runs without rematch.

Two formats, one fold (see :mod:`rematch.export.fold`):

* ``transformers``: an ordinary Qwen2-VL / Qwen2.5-VL checkpoint with the learnable tokens
  in its vocabulary, ``rematch_embedding.json`` (the settings rematch encoded with),
  ``rematch_embedding.py`` (the few lines that reproduce the embedding) and the projector;
* ``sentence-transformers``: the same, plus a custom module, so that
  ``SentenceTransformer(OUT, trust_remote_code=True)`` loads it.

Each is written to a temporary sibling and renamed into place, with a model card. An
earlier export of the same format is replaced; one of the other format is not (a
sentence-transformers export has files a transformers export would silently drop, and
the reverse changes how the directory loads) unless ``overwrite`` says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from rematch.atomic import ReplaceRefusedError, write_directory_atomically
from rematch.evaluation.report import read_eval_table
from rematch.hub.card import CARD_NAME, model_card_for
from rematch.export.fold import SETTINGS_NAME, write_transformers_checkpoint

EXPORT_FORMATS = ("transformers", "sentence-transformers")
#: The file only a sentence-transformers export has (sentence-transformers reads it first).
ST_MARKER = "modules.json"


def export_format_of(directory: Path) -> str | None:
    """Which of :data:`EXPORT_FORMATS` the export in ``directory`` is, or None if it holds no export."""
    directory = Path(directory)
    if not (directory / SETTINGS_NAME).is_file():
        return None
    return "sentence-transformers" if (directory / ST_MARKER).is_file() else "transformers"


def check_export_target(out: Path, output_format: str, overwrite: bool) -> None:
    """Refuse to replace an export of the other format without ``overwrite`` (before any work)."""
    existing = export_format_of(out) if Path(out).is_dir() else None
    if overwrite or existing is None or existing == output_format:
        return
    raise ReplaceRefusedError(f"{out} holds a {existing} export; writing a {output_format} export there would "
                              f"replace it: give --format {existing} to update it, choose another directory, or "
                              "pass --overwrite (overwrite=True) to replace it")


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
    out = Path(out)
    check_export_target(out, output_format, overwrite)
    if model.is_untrained() and not allow_untrained:
        raise ValueError("this model's ReMatch heads are untrained (random), so an export would embed "
                         "meaninglessly; export a trained model, or pass allow_untrained=True (--allow-untrained)")
    table = read_eval_table(eval_dir, model.fingerprint()) if eval_dir is not None else None
    # the card's examples load the export where it is written (push restages the card with the hub id)
    card = model_card_for(model, output_format=output_format, model_dir=model_dir, eval_table=table,
                          location=str(out))

    def write(directory: Path) -> None:
        write_transformers_checkpoint(model, directory)
        if output_format == "sentence-transformers":
            from rematch.export.st_format import write_sentence_transformers_files

            write_sentence_transformers_files(directory)
        (directory / CARD_NAME).write_text(card, encoding="utf-8")

    # any earlier export is rematch's to replace; one of the other format only with overwrite (checked above)
    write_directory_atomically(out, write, is_ours=lambda target: export_format_of(target) is not None,
                               what="an exported ReMatch model", overwrite=overwrite)
    return out
