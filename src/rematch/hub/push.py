"""Pushing a ReMatch model to the Hugging Face hub: stage a folder with its card, then upload it.

Everything up to the upload is ordinary file work that the tests check (the staged folder
holds every file of the model and a card naming the repository, with the evaluation table
when asked); the upload itself is one ``huggingface_hub`` call (:func:`upload_folder`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from rematch.hub.card import CARD_NAME, TRAINING_CONFIG_NAME, EvalTable, read_training_config, render_card
from rematch.hub.resolve import HUB_ID
from rematch.saved_model import CONFIG_NAME, NotAReMatchModelError, read_rematch_meta


class PushError(ValueError):
    """A model cannot be pushed as asked (a bad repository id, an untrained model...)."""


def check_repo_id(repo_id: str) -> str:
    """``org/name`` of safe characters (the hub's own rule), checked before any work."""
    if not isinstance(repo_id, str) or not HUB_ID.fullmatch(repo_id) or ".." in repo_id or \
            repo_id.split("/")[1].endswith((".git", ".")):
        raise PushError(f"repository id {repo_id!r} is not of the form org/name (letters, digits, '-', '_', '.')")
    return repo_id


def stage_model_directory(model_dir: str | os.PathLike, staging: str | os.PathLike, repo_id: str, *,
                          eval_table: EvalTable | None = None, fingerprint: str | None = None,
                          license: str | None = None, allow_untrained: bool = False) -> Path:
    """Fill ``staging`` with the files of the saved model in ``model_dir`` and a card for ``repo_id``.

    Files are hard-linked where the file system allows (a 7B model is not copied); the card
    is written anew (never into ``model_dir``). ``fingerprint`` (the loaded model's) is checked
    against the one ``eval_table`` records (``rematch.evaluation.report.read_eval_table``).
    """
    check_repo_id(repo_id)
    source = Path(model_dir)
    meta = read_rematch_meta(source)
    if meta is None:
        raise NotAReMatchModelError(f"{source} is not a saved ReMatch model ({CONFIG_NAME} is missing)")
    if meta.get("untrained") and not allow_untrained:
        raise PushError(f"{source} holds an untrained model (random ReMatch heads); push a trained one, or pass "
                        "--allow-untrained (allow_untrained=True)")
    if eval_table is not None:
        eval_table.check_model(fingerprint)
    card = render_card(meta["model"], model_type=meta["model_type"], model_id=repo_id,
                       training_config=read_training_config(source), eval_table=eval_table, license=license)
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or relative.parts[0].startswith(".") or relative == Path(CARD_NAME):
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(path, target)
    (staging / CARD_NAME).write_text(card, encoding="utf-8")
    return staging


def push_model(model, repo_id: str, *, private: bool = False, eval_table: EvalTable | None = None,
               license: str | None = None, token: str | None = None, allow_untrained: bool = False,
               commit_message: str = "Upload ReMatch model") -> str:
    """``model.save_pretrained`` into a temporary folder, its card for ``repo_id``, then the upload; returns the URL."""
    check_repo_id(repo_id)
    if model.is_untrained() and not allow_untrained:
        raise PushError("this model's ReMatch heads are untrained (random); push a trained model, or pass "
                        "allow_untrained=True")
    with tempfile.TemporaryDirectory(prefix="rematch-push-") as tmp:
        saved = Path(tmp) / "model"
        model.save_pretrained(saved)
        _copy_training_config(model, saved)
        staged = stage_model_directory(saved, Path(tmp) / "staged", repo_id, eval_table=eval_table,
                                       fingerprint=model.fingerprint(), license=license, allow_untrained=True)
        return upload_folder(staged, repo_id, private=private, token=token, commit_message=commit_message)


def upload_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                  commit_message: str = "Upload ReMatch model") -> str:
    """Create the repository (if new) and upload ``folder`` to it: the only network step."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message=commit_message)
    return str(getattr(commit, "repo_url", None) or f"https://huggingface.co/{repo_id}")


def _copy_training_config(model, saved: Path) -> None:
    """The recipe of a model loaded from a local directory travels with it (save_pretrained alone cannot know it)."""
    source = model.heads_source
    if source and os.path.isdir(source) and (Path(source) / TRAINING_CONFIG_NAME).is_file() \
            and not (saved / TRAINING_CONFIG_NAME).is_file():
        shutil.copyfile(Path(source) / TRAINING_CONFIG_NAME, saved / TRAINING_CONFIG_NAME)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)
