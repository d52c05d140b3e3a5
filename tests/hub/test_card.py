"""Model cards and hub pushes: everything up to the upload call (folder contents, card).

The upload itself (``rematch.hub.push.upload_folder``, two huggingface_hub calls) is the
one network step; where a test goes through push, that function is replaced by one that
records the folder it was given, so the staged folder is what gets checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from rematch import Config, ReMatchModel
from rematch.cli import main
from rematch.config import dump_yaml
from rematch.evaluation.report import summarize, write_summary
from rematch.evaluation.report import read_eval_table
from rematch.hub.card import TRAINING_CONFIG_NAME, EvalSummaryError, render_card
from rematch.hub.push import PushError, stage_model_directory


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def trained_tiny(k: int = 2, **fields) -> ReMatchModel:
    """A tiny model whose heads moved from their init, as after an optimiser step (so not 'untrained')."""
    model = ReMatchModel.tiny(num_tokens=k, **fields)
    with torch.no_grad():
        model.query_tokens.add_(0.01)
    return model


def eval_dir_for(tmp_path: Path, fingerprint: str) -> Path:
    results = {"CIRR": {"hit@1": 0.125, "hit@5": 0.5, "mrr": 0.3, "count": 8, "meta_task": "retrieval",
                        "split": "IND"},
               "GQA": {"hit@1": 0.75, "hit@5": 1.0, "mrr": 0.8, "count": 4, "meta_task": "vqa", "split": "OOD"}}
    out = tmp_path / "eval"
    write_summary(summarize(results, fingerprint=fingerprint, tie_rule="official"), out, plot=False)
    return out


def test_save_pretrained_writes_a_card(tmp_path):
    model = ReMatchModel.tiny(num_tokens=2)
    model.save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "rematch" and meta["pipeline_tag"] == "feature-extraction"
    assert {"rematch", "multimodal-embedding", "qwen2-vl"} <= set(meta["tags"])
    assert "base_model" not in meta and "datasets" not in meta  # a tiny random backbone, no known data
    assert f'ReMatchModel.from_pretrained("{tmp_path / "m"}")' in card
    assert f"rematch encode --model {tmp_path / 'm'}" in card
    assert "## Training recipe" not in card and "## Evaluation" not in card
    assert not (tmp_path / "m" / TRAINING_CONFIG_NAME).exists()
    ReMatchModel.from_pretrained(tmp_path / "m", device="cpu")  # the card does not disturb loading


def test_a_model_saved_into_its_run_directory_carries_the_recipe(tmp_path):
    config = Config()
    config.data.source = "TIGER-Lab/MMEB-train"
    config.loss.matching = 0.25
    config.train.steps = 2500
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"run_id": "abc"}))  # what the training loop writes first
    dump_yaml(config, run / "config.yaml")
    trained_tiny().save_pretrained(run / "model")

    saved = run / "model"
    assert (saved / TRAINING_CONFIG_NAME).read_text() == (run / "config.yaml").read_text()
    card = (saved / "README.md").read_text()
    assert front_matter(card)["datasets"] == ["TIGER-Lab/MMEB-train"]
    assert "## Training recipe" in card and "| loss.matching | 0.25 |" in card and "| train.steps | 2500 |" in card
    assert "<details>" in card and "builtin_train_rows" in card  # the full config follows the table

    # a model loaded from there and saved elsewhere (e.g. after merge-lora) keeps its recipe
    ReMatchModel.from_pretrained(saved, device="cpu").save_pretrained(tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / TRAINING_CONFIG_NAME).read_text() == (run / "config.yaml").read_text()
    assert "| loss.matching | 0.25 |" in (tmp_path / "elsewhere" / "README.md").read_text()


def test_card_front_matter_names_a_hub_base_model_and_license():
    card = render_card({"backbone": "Qwen/Qwen2-VL-2B-Instruct", "num_tokens": 16}, model_type="qwen2_vl",
                       model_id="me/rematch-2b", license="apache-2.0")
    meta = front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen2-VL-2B-Instruct" and meta["license"] == "apache-2.0"
    assert "# rematch-2b" in card and 'from_pretrained("me/rematch-2b")' in card
    local = render_card({"backbone": "/data/checkpoints/qwen", "num_tokens": 4}, model_type="qwen2_5_vl")
    assert "base_model" not in front_matter(local)  # a local path is no hub reference
    with pytest.raises(ValueError, match="output_format"):
        render_card({}, model_type="qwen2_vl", output_format="onnx")


def test_staged_folder_has_every_file_and_a_card_with_the_scores(tmp_path):
    model = trained_tiny()
    model.save_pretrained(tmp_path / "m")
    evaluation = eval_dir_for(tmp_path, model.fingerprint())
    staged = stage_model_directory(tmp_path / "m", tmp_path / "staged", "me/rematch-tiny",
                                   eval_table=read_eval_table(evaluation),
                                   fingerprint=model.fingerprint(), license="mit")
    source_files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {p.name for p in staged.iterdir()} == source_files
    for name in source_files - {"README.md"}:
        assert (staged / name).read_bytes() == (tmp_path / "m" / name).read_bytes()
    card = (staged / "README.md").read_text()
    assert front_matter(card)["license"] == "mit"
    assert 'ReMatchModel.from_pretrained("me/rematch-tiny")' in card and str(tmp_path) not in card
    assert "## Evaluation (MMEB protocol)" in card
    assert "| CIRR | 12.50 |" in card and "| GQA | 75.00 |" in card
    assert "| overall | 2 | 43.75 |" in card and "Only 2 of the 36 MMEB subsets" in card
    assert (tmp_path / "m" / "README.md").read_text() != card  # the model directory itself is untouched
    ReMatchModel.from_pretrained(staged, device="cpu")  # what is uploaded loads as a ReMatch model


def test_staging_refuses_what_must_not_be_pushed(tmp_path):
    model = trained_tiny()
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(EvalSummaryError, match="another model's numbers"):
        stage_model_directory(tmp_path / "m", tmp_path / "s1", "me/x",
                              eval_table=read_eval_table(eval_dir_for(tmp_path, "0" * 24)),
                              fingerprint=model.fingerprint())
    with pytest.raises(EvalSummaryError, match="another model's numbers"):
        read_eval_table(eval_dir_for(tmp_path / "again", "0" * 24), fingerprint=model.fingerprint())
    with pytest.raises(EvalSummaryError, match="summary.json"):
        read_eval_table(tmp_path / "nowhere")
    for bad in ("no-slash", "a/b/c", "me/../x", "me/x y", ""):
        with pytest.raises(PushError, match="org/name"):
            stage_model_directory(tmp_path / "m", tmp_path / "s3", bad)
    ReMatchModel.tiny(num_tokens=2).save_pretrained(tmp_path / "untrained")
    with pytest.raises(PushError, match="untrained"):
        stage_model_directory(tmp_path / "untrained", tmp_path / "s4", "me/x")
    assert stage_model_directory(tmp_path / "untrained", tmp_path / "s5", "me/x", allow_untrained=True).is_dir()


@pytest.fixture
def recorded_uploads(monkeypatch):
    """Replaces only the network step: records what would be uploaded."""
    uploads = []

    def upload_folder(folder, repo_id, *, private=False, token=None, commit_message=""):
        folder = Path(folder)
        uploads.append({"repo_id": repo_id, "private": private, "files": sorted(p.name for p in folder.iterdir()),
                        "card": (folder / "README.md").read_text()})
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr("rematch.hub.push.upload_folder", upload_folder)
    return uploads


def test_push_to_hub_uploads_the_saved_model_with_its_card(tmp_path, recorded_uploads):
    model = trained_tiny()
    url = model.push_to_hub("me/rematch-tiny", private=True,
                            eval_table=read_eval_table(eval_dir_for(tmp_path, model.fingerprint())))
    assert url == "https://huggingface.co/me/rematch-tiny"
    (upload,) = recorded_uploads
    assert upload["private"] is True
    assert {"rematch_config.json", "rematch_heads.safetensors", "model.safetensors", "config.json",
            "README.md"} <= set(upload["files"])
    assert "| GQA | 75.00 |" in upload["card"] and 'from_pretrained("me/rematch-tiny")' in upload["card"]
    with pytest.raises(PushError, match="untrained"):
        ReMatchModel.tiny(num_tokens=2).push_to_hub("me/x")
    assert len(recorded_uploads) == 1


def test_push_command(tmp_path, recorded_uploads, capsys):
    model = trained_tiny()
    model.save_pretrained(tmp_path / "m")
    evaluation = eval_dir_for(tmp_path, model.fingerprint())
    assert main(["push", str(tmp_path / "m"), "me/rematch-tiny", "--eval", str(evaluation)]) == 0
    assert "pushed" in capsys.readouterr().out
    assert recorded_uploads[-1]["private"] is False and "| CIRR | 12.50 |" in recorded_uploads[-1]["card"]
    assert main(["push", str(tmp_path / "m"), "not a repo"]) == 1
    assert "org/name" in capsys.readouterr().err
    other = eval_dir_for(tmp_path / "other", "f" * 24)
    assert main(["push", str(tmp_path / "m"), "me/x", "--eval", str(other)]) == 1
    assert "another model's numbers" in capsys.readouterr().err
    assert len(recorded_uploads) == 1
