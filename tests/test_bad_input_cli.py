"""Bad input through the real CLI, as a careless or hostile user would give it.

Every case runs ``python -m rematch.cli`` as a subprocess and checks what a user sees: exit
status 1, ONE line ``rematch: error: ...`` naming what is wrong (and where), no traceback,
nothing changed on disk, and no hang (each case has a time limit).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT = 120


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "rematch.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, cwd=cwd)


def assert_clear_error(result: subprocess.CompletedProcess, *fragments: str, status: int = 1) -> None:
    assert result.returncode == status, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("rematch")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # progress bars of model loading may precede it
    assert errors[0].startswith("rematch: error: "), errors[0]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """argparse's own refusal of a flag value: status 2, the flag named, no traceback."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (hidden ones too) with a hash of its bytes."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad-input") / "model"
    completed = run_cli("tiny", "--out", out, "--k", "2")
    assert completed.returncode == 0, completed.stderr
    return out


@pytest.fixture()
def user_files(tmp_path) -> Path:
    folder = tmp_path / "my-thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("\\chapter{Introduction}")
    (folder / ".hidden").write_text("keep me")
    return folder


# ------------------------------------------------------------------ data loss


@pytest.mark.parametrize("target_kind", ["folder", "file"])
def test_saving_a_model_over_the_users_files_is_refused(tmp_path, user_files, target_kind):
    target = user_files if target_kind == "folder" else user_files / "chapter1.tex"
    before = tree_digest(user_files)
    result = run_cli("tiny", "--out", target, "--k", "2")
    assert_clear_error(result, str(target), "refusing to replace", "--overwrite")
    assert tree_digest(user_files) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-thesis"]  # no hidden .old / .tmp left


def test_merge_lora_of_a_model_without_lora_and_over_user_files(saved_model, user_files):
    before = tree_digest(user_files)
    assert_clear_error(run_cli("merge-lora", saved_model, user_files), "no LoRA adapters")
    assert tree_digest(user_files) == before


def test_saving_over_a_saved_model_replaces_it(tmp_path, saved_model):
    target = tmp_path / "again"
    assert run_cli("tiny", "--out", target, "--k", "2").returncode == 0
    assert run_cli("tiny", "--out", target, "--k", "3").returncode == 0  # a ReMatch model: ours to replace
    assert json.loads((target / "rematch_config.json").read_text())["num_tokens"] == 3


# ------------------------------------------------------------------ silent wrong results


@pytest.mark.parametrize("args,flag", [
    (["encode", "--model", "{model}", "--input", "{items}", "--out", "{out}", "--batch-size", "0"], "--batch-size"),
    (["encode", "--model", "{model}", "--input", "{items}", "--out", "{out}", "--batch-size", "-3"], "--batch-size"),
    (["index", "build", "--model", "{model}", "--corpus", "{items}", "--out", "{out}", "--shard-size", "0"],
     "--shard-size"),
    (["index", "build", "--model", "{model}", "--corpus", "{items}", "--out", "{out}", "--hnsw-m", "-1"], "--hnsw-m"),
    (["tiny", "--out", "{out}", "--k", "-2"], "--k"),
])
def test_numeric_flags_are_validated_at_the_boundary(tmp_path, saved_model, args, flag):
    items = tmp_path / "items.jsonl"
    items.write_text('{"id": "a", "text": "a red circle"}\n')
    filled = [a.format(model=saved_model, items=items, out=tmp_path / "out") for a in args]
    assert_usage_error(run_cli(*filled), flag)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override,name", [("train.lr=nan", "train.lr"), ("train.lr=-1", "train.lr"),
                                           ("train.warmup_ratio=1.5", "train.warmup_ratio"),
                                           ("train.log_every=0", "train.log_every"),
                                           ("loss.temperature=inf", "loss.temperature")])
def test_bad_training_config_values_are_refused_before_anything_runs(tmp_path, override, name):
    key, value = override.split("=")
    result = run_cli("train", "--out", tmp_path / "run", f"--{key}", value)
    assert_clear_error(result, name)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ hangs, runaway memory, unreadable input


def test_a_model_directory_without_config_json_fails_fast(tmp_path, saved_model):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_model, broken)
    (broken / "config.json").unlink()
    items = tmp_path / "items.jsonl"
    items.write_text('{"text": "a red circle"}\n')
    assert_clear_error(run_cli("encode", "--model", broken, "--input", items, "--out", tmp_path / "v.npy"),
                       str(broken), "missing config.json")


def test_a_typo_in_a_local_model_path_names_the_path(tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text('{"text": "a red circle"}\n')
    result = run_cli("encode", "--model", "./m/nope", "--input", items, "--out", tmp_path / "v.npy", cwd=tmp_path)
    assert_clear_error(result, "m/nope")


def test_a_fifo_and_control_tokens_in_a_corpus_are_named(tmp_path, saved_model):
    os.mkfifo(tmp_path / "x.png")
    items = tmp_path / "items.jsonl"
    items.write_text('{"text": "fine"}\n{"image": "%s"}\n' % (tmp_path / "x.png"))
    result = run_cli("encode", "--model", saved_model, "--input", items, "--out", tmp_path / "v.npy")
    assert_clear_error(result, "row 1", "x.png", "not a regular file")
    items.write_text('{"text": "fine"}\n{"text": "stop <|im_end|> here"}\n')
    result = run_cli("encode", "--model", saved_model, "--input", items, "--out", tmp_path / "v.npy")
    assert_clear_error(result, "row 1", "<|im_end|>")
    assert not (tmp_path / "v.npy").exists()


def test_a_damaged_index_of_the_same_size_is_refused(tmp_path, saved_model):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document {i}"}) + "\n" for i in range(5)))
    assert run_cli("index", "build", "--model", saved_model, "--corpus", corpus, "--out", tmp_path / "index",
                   "--allow-untrained").returncode == 0
    items = tmp_path / "index" / "items.jsonl"
    items.write_text(items.read_text().replace('"d1"', '"d9"'))  # same size, other id
    result = run_cli("search", "--index", tmp_path / "index", "--text", "document 1")
    assert_clear_error(result, "content hash")
