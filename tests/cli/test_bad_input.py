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

import numpy as np
import pytest
import torch

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
    completed = run_cli("tiny", "--out", out, "--num-tokens", "2")
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
    result = run_cli("tiny", "--out", target, "--num-tokens", "2")
    assert_clear_error(result, str(target), "refusing to replace", "--overwrite")
    assert tree_digest(user_files) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-thesis"]  # no hidden .old / .tmp left


def test_merge_lora_of_a_model_without_lora_and_over_user_files(saved_model, user_files):
    before = tree_digest(user_files)
    assert_clear_error(run_cli("merge-lora", saved_model, user_files), "no LoRA adapters")
    assert tree_digest(user_files) == before


def test_saving_over_a_saved_model_replaces_it(tmp_path, saved_model):
    target = tmp_path / "again"
    assert run_cli("tiny", "--out", target, "--num-tokens", "2").returncode == 0
    assert run_cli("tiny", "--out", target, "--num-tokens", "3").returncode == 0  # a ReMatch model: ours to replace
    assert json.loads((target / "rematch_config.json").read_text())["num_tokens"] == 3


# ------------------------------------------------------------------ silent wrong results


@pytest.mark.parametrize("args,flag", [
    (["encode", "--model", "{model}", "--input", "{items}", "--out", "{out}", "--batch-size", "0"], "--batch-size"),
    (["encode", "--model", "{model}", "--input", "{items}", "--out", "{out}", "--batch-size", "-3"], "--batch-size"),
    (["index", "build", "--model", "{model}", "--corpus", "{items}", "--out", "{out}", "--shard-size", "0"],
     "--shard-size"),
    (["index", "build", "--model", "{model}", "--corpus", "{items}", "--out", "{out}", "--hnsw-m", "-1"], "--hnsw-m"),
    (["tiny", "--out", "{out}", "--num-tokens", "-2"], "--num-tokens"),
    (["mine", "--random", "--data", "{items}", "--out", "{out}", "--max-ratio", "nan"], "--max-ratio"),
    (["mine", "--random", "--data", "{items}", "--out", "{out}", "--max-ratio", "-1"], "--max-ratio"),
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
    result = run_cli("encode", "--model", saved_model, "--input", items, "--out", tmp_path / "v.npy",
                     "--allow-untrained")
    assert_clear_error(result, "row 1", "x.png", "not a regular file")
    items.write_text('{"text": "fine"}\n{"text": "stop <|im_end|> here"}\n')
    result = run_cli("encode", "--model", saved_model, "--input", items, "--out", tmp_path / "v.npy",
                     "--allow-untrained")
    assert_clear_error(result, "row 1", "<|im_end|>")
    assert not (tmp_path / "v.npy").exists()


def test_a_damaged_index_of_the_same_size_is_refused(tmp_path, saved_model):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document {i}"}) + "\n" for i in range(5)))
    assert run_cli("index", "build", "--model", saved_model, "--corpus", corpus, "--out", tmp_path / "index",
                   "--allow-untrained").returncode == 0
    items = tmp_path / "index" / "items.jsonl"
    items.write_text(items.read_text().replace('"d1"', '"d9"'))  # same size, other id
    result = run_cli("search", "--index", tmp_path / "index", "--text", "document 1", "--allow-untrained")
    assert_clear_error(result, "content hash")


# ------------------------------------------------------------------ found by scripts/probe_bad_input.py
#
# One subprocess per class of problem proves the real entry point (one line, no traceback, no
# hang); the other variants of the class run in this process through the same ``main`` (no
# interpreter start-up, so the file stays fast): an exception escaping ``main`` is exactly
# what a user would have seen as a traceback, and fails the test.


def run_in_process(capsys, *args) -> tuple[int, list[str]]:
    """``rematch ARGS`` in this process: its exit status and non-empty stderr lines (the message
    of a ``SystemExit`` last)."""
    from rematch.cli import main

    capsys.readouterr()
    message = None
    try:
        status = main([str(arg) for arg in args])
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
        message = None if isinstance(stop.code, int) else str(stop.code)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return status, lines + ([message] if message else [])


def assert_clear_in_process(outcome: tuple[int, list[str]], *fragments: str) -> None:
    status, lines = outcome
    assert status == 1 and lines and lines[-1].startswith("rematch: error: "), outcome
    assert sum(line.startswith("rematch") for line in lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def test_an_input_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "items.jsonl")  # reading it would wait forever for a writer
    result = run_cli("encode", "--model", "tiny", "--allow-untrained", "--input", tmp_path / "items.jsonl",
                     "--out", tmp_path / "v.npy")
    assert_clear_error(result, "items.jsonl", "not a regular file")


@pytest.mark.parametrize("content,fragments", [
    (b"\x00\xff\xfe\x00" * 64, ("line 1", "not UTF-8")),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", ("line 1", "nested too deeply")),
    (b"\n  \n", ("no rows",)),
    (b'{"text": "fine"}\n{"text": "bad \\ud800 surrogate"}\n', ("row 1", "'text'", "surrogate")),
], ids=["binary", "deep-nesting", "blank", "lone-surrogate"])
def test_unreadable_rows_are_named_not_a_traceback(tmp_path, capsys, content, fragments):
    items = tmp_path / "items.jsonl"
    items.write_bytes(content)
    outcome = run_in_process(capsys, "encode", "--model", "tiny", "--allow-untrained", "--input", items,
                             "--out", tmp_path / "v.npy")
    assert_clear_in_process(outcome, str(items), *fragments)
    assert not (tmp_path / "v.npy").exists()


def test_encode_never_writes_over_a_users_file(tmp_path, user_files):
    (user_files / "vectors.npy").write_text("my own notes, not an array")
    items = tmp_path / "items.jsonl"
    items.write_text('{"text": "a red circle"}\n')
    before = tree_digest(user_files)
    result = run_cli("encode", "--model", "tiny", "--allow-untrained", "--input", items,
                     "--out", user_files / "vectors.npy")
    assert_clear_error(result, "vectors.npy", "refusing to replace", "--overwrite")
    assert tree_digest(user_files) == before


def test_encode_output_paths(tmp_path, user_files, capsys):
    items = tmp_path / "items.jsonl"
    items.write_text('{"text": "a red circle"}\n{"text": "a blue square"}\n')
    common = ["encode", "--model", "tiny", "--allow-untrained", "--input", items, "--out"]
    before = tree_digest(user_files)
    # np.save appended ".npy" itself, so the array landed beside the path the message named
    assert_clear_in_process(run_in_process(capsys, *common, user_files / "notes"), "ending in .npy")
    assert_clear_in_process(run_in_process(capsys, *common, user_files), "is a directory")
    assert tree_digest(user_files) == before
    out = tmp_path / "v.npy"
    for _ in range(2):  # an array we wrote before is ours to replace
        assert run_in_process(capsys, *common, out)[0] == 0
        assert np.load(out).shape[0] == 2 and np.isfinite(np.load(out)).all()


def test_a_device_this_machine_lacks_is_named(tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    items.write_text('{"text": "a red circle"}\n')
    encode = ["encode", "--model", "tiny", "--allow-untrained", "--input", items, "--out", tmp_path / "v.npy"]
    assert_clear_error(run_cli(*encode, "--device", "tpu:9"), "--device 'tpu:9'", "not a device")
    assert_clear_in_process(run_in_process(capsys, *encode, "--device", "cuda:77"), "--device cuda:77")


def test_a_saved_but_never_trained_model_still_needs_allow_untrained(tmp_path, saved_model, capsys):
    items = tmp_path / "items.jsonl"
    items.write_text('{"text": "a red circle"}\n')
    result = run_cli("encode", "--model", saved_model, "--input", items, "--out", tmp_path / "v.npy")
    assert_clear_error(result, str(saved_model), "untrained", "--allow-untrained")
    assert json.loads((saved_model / "rematch_config.json").read_text())["untrained"] is True

    from rematch import ReMatchModel

    model = ReMatchModel.tiny(num_tokens=2)  # trained a little: its heads changed in place, as an optimiser step does
    with torch.no_grad():
        model.query_tokens.add_(0.1)
    model.save_pretrained(tmp_path / "trained")
    assert ReMatchModel.from_pretrained(tmp_path / "trained").heads_source == str(tmp_path / "trained")
    assert ReMatchModel.from_pretrained(saved_model).heads_source is None


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _one_more_layer(config: dict) -> None:
    config["text_config"]["num_hidden_layers"] += 1


def _other_hidden_size(config: dict) -> None:
    config["text_config"]["hidden_size"] *= 2


@pytest.mark.parametrize("damage,fragments", [
    (lambda m: _truncate(m / "model.safetensors"), ("damaged or truncated",)),
    (lambda m: _truncate(m / "rematch_heads.safetensors"), ("rematch_heads.safetensors", "damaged or truncated")),
    (lambda m: _edit_json(m / "config.json", _one_more_layer), ("config.json",)),
    (lambda m: _edit_json(m / "config.json", _other_hidden_size), ("config.json", "do not match")),
    (lambda m: _edit_json(m / "rematch_config.json", lambda c: c.pop("hidden_size")), ("'hidden_size'",)),
], ids=["truncated-weights", "truncated-heads", "config-one-more-layer", "config-other-hidden-size",
        "rematch-config-without-hidden-size"])
def test_a_damaged_model_directory_is_named_not_a_traceback(tmp_path, saved_model, capsys, damage, fragments):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_model, broken)
    damage(broken)
    items = tmp_path / "items.jsonl"
    items.write_text('{"text": "a red circle"}\n')
    outcome = run_in_process(capsys, "encode", "--model", broken, "--allow-untrained", "--input", items,
                             "--out", tmp_path / "v.npy")
    assert_clear_in_process(outcome, str(broken), *fragments)


@pytest.mark.parametrize("damage,fragments", [
    (lambda m: _truncate(m / "adapter_model.safetensors"), ("LoRA adapter", "damaged or truncated")),
    (lambda m: (m / "adapter_config.json").write_text("{"), ("adapter_config.json", "not valid JSON")),
    (lambda m: (m / "adapter_model.safetensors").unlink(), ("missing adapter_model.safetensors",)),
], ids=["truncated-adapter", "broken-adapter-config", "no-adapter-weights"])
def test_a_damaged_lora_adapter_is_named_not_a_traceback(tmp_path, capsys, damage, fragments):
    from rematch import ReMatchModel

    model = ReMatchModel.tiny(num_tokens=2)
    model.enable_lora(r=2, alpha=4)
    model.save_pretrained(tmp_path / "lora")
    damage(tmp_path / "lora")
    outcome = run_in_process(capsys, "merge-lora", tmp_path / "lora", tmp_path / "merged")
    assert_clear_in_process(outcome, str(tmp_path / "lora"), *fragments)
    assert not (tmp_path / "merged").exists()


def test_a_config_file_that_is_not_yaml_is_named(tmp_path):
    (tmp_path / "recipe.yaml").write_text("model:\n  num_tokens: [1\n  k: : :\n")
    result = run_cli("train", "--config", tmp_path / "recipe.yaml", "--out", tmp_path / "run")
    assert_clear_error(result, "recipe.yaml", "not a valid YAML file")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,value,name", [
    ("lora.r", "0", "lora.r"), ("lora.dropout", "2", "lora.dropout"), ("lora.alpha", "-1", "lora.alpha"),
    ("lora.target_modules", "((", "lora.target_modules"), ("train.scheduler", "bogus", "train.scheduler"),
    ("model.num_tokens", "100000000", "model.num_tokens"), ("model.min_pixels", "-5", "model.min_pixels"),
    ("model.num_tokens", "[1", "model.num_tokens"),
])
def test_more_bad_training_values_are_refused_before_anything_runs(tmp_path, capsys, key, value, name):
    outcome = run_in_process(capsys, "train", "--out", tmp_path / "run", f"--{key}", value)
    assert_clear_in_process(outcome, name)
    assert not (tmp_path / "run").exists()


def test_synth_never_writes_into_a_users_folder(user_files):
    before = tree_digest(user_files)
    result = run_cli("data", "synth", "--out", user_files, "--train-rows", "5", "--eval-queries", "1",
                     "--candidates", "4", "--image-size", "28")
    assert_clear_error(result, str(user_files), "refusing to replace", "--overwrite")
    assert tree_digest(user_files) == before


@pytest.mark.parametrize("flags,fragment", [
    (["--image-size", "100000"], "--image-size"), (["--candidates", "1000000000"], "--candidates"),
    (["--train-rows", "0", "--eval-queries", "0"], "both 0"),
])
def test_synth_sizes_that_cannot_make_a_world_are_refused(tmp_path, capsys, flags, fragment):
    sizes = {"--train-rows": "5", "--eval-queries": "1", "--candidates": "4", "--image-size": "28"}
    sizes.update(zip(flags[::2], flags[1::2]))
    args = [token for pair in sizes.items() for token in pair]
    assert_clear_in_process(run_in_process(capsys, "data", "synth", "--out", tmp_path / "s", *args), fragment)
    assert not (tmp_path / "s").exists()


def test_synth_replaces_its_own_world(tmp_path, capsys):
    synth = ["data", "synth", "--out", tmp_path / "s", "--image-size", "28", "--candidates", "4"]
    assert run_in_process(capsys, *synth, "--train-rows", "5", "--eval-queries", "0")[0] == 0
    assert run_in_process(capsys, *synth, "--train-rows", "0", "--eval-queries", "1")[0] == 0
    assert sorted(p.name for p in (tmp_path / "s").rglob("*.jsonl")) == ["test.jsonl"] * 5  # no stale train rows


@pytest.fixture(scope="module")
def built_index(tmp_path_factory) -> Path:
    from rematch.cli import main

    root = tmp_path_factory.mktemp("index")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"document {i}"}) + "\n"
                                               for i in range(4)))
    assert main(["index", "build", "--model", "tiny", "--allow-untrained", "--corpus", str(root / "corpus.jsonl"),
                 "--out", str(root / "index")]) == 0
    return root / "index"


@pytest.mark.parametrize("change,fragment", [
    (lambda m: m.pop("files"), "'files'"), (lambda m: m.update(count="four"), "'count'"),
    (lambda m: m.update(index_type="ivf"), "index_type"),
], ids=["no-files", "count-text", "wrong-index-type"])
def test_a_damaged_index_manifest_is_named(tmp_path, built_index, capsys, change, fragment):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(built_index, index)
    _edit_json(index / "manifest.json", change)
    outcome = run_in_process(capsys, "search", "--index", index, "--model", "tiny", "--allow-untrained",
                             "--text", "document 1")
    assert_clear_in_process(outcome, "manifest" if fragment != "index_type" else str(index), fragment)


@pytest.mark.parametrize("row,fragment", [('{"id": "a", "text": "a", "score": NaN}', "'score'"),
                                          ('{"id": NaN, "text": "a"}', "'id'")])
def test_corpus_values_json_cannot_hold_are_named(tmp_path, capsys, row, fragment):
    (tmp_path / "corpus.jsonl").write_text(row + "\n")
    outcome = run_in_process(capsys, "index", "build", "--model", "tiny", "--allow-untrained", "--corpus",
                             tmp_path / "corpus.jsonl", "--out", tmp_path / "index")
    assert_clear_in_process(outcome, "corpus.jsonl line 1", fragment)
    assert not (tmp_path / "index").exists()
