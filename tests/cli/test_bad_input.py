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

from tests.support.cli import assert_clear_in_process, run_in_process
from rematch.data.items import Item

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
    assert run_in_process(capsys, *common, out)[0] == 0
    # an existing array may be the user's own: replaced only with --overwrite (issue 27)
    assert_clear_in_process(run_in_process(capsys, *common, out), "v.npy", "--overwrite")
    assert run_in_process(capsys, *common, out, "--overwrite")[0] == 0
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


# ------------------------------------------------------------------ issue 27: stale or wrong vectors


def _copy_model(source: Path, target: Path, change=None) -> Path:
    import shutil

    shutil.copytree(source, target)
    if change is not None:
        change(target)
    return target


def _without_checksums(model_dir: Path) -> None:
    """What a model saved before weight checksums were recorded holds."""
    _edit_json(model_dir / "rematch_config.json", lambda meta: meta.pop("checksums"))


@pytest.mark.parametrize("edit", [
    lambda m: _edit_json(m / "preprocessor_config.json", lambda c: c.update(image_mean=[0.5, 0.5, 0.5])),
    lambda m: _edit_json(m / "tokenizer.json", lambda t: t.update(
        normalizer={"type": "Replace", "pattern": {"String": "q"}, "content": "k"})),
    lambda m: _edit_json(m / "config.json", lambda c: c["text_config"].update(rms_norm_eps=1e-3)),
], ids=["preprocessor", "tokenizer", "backbone-config"])
def test_the_fingerprint_covers_every_file_that_changes_a_vector(tmp_path, saved_model, built_index, capsys, edit):
    """An index or an eval cache made with a model is not used with the model after an edit of
    its preprocessor, tokenizer or backbone configuration (they change the vectors, not a weight)."""
    from rematch import ReMatchModel
    from rematch.encoding.cache import CachedEncoder

    original = ReMatchModel.from_pretrained(saved_model)
    edited_dir = _copy_model(saved_model, tmp_path / "edited", edit)
    edited = ReMatchModel.from_pretrained(edited_dir)
    assert edited.fingerprint() != original.fingerprint()
    items = [Item(text="a quiet red circle")]
    first = CachedEncoder(original, tmp_path / "cache")
    first.encode(items, "query")
    again = CachedEncoder(edited, tmp_path / "cache")
    again.encode(items, "query")
    assert (first.stats.encoded, again.stats.encoded, again.stats.cached) == (1, 1, 0)  # not served stale
    index = tmp_path / "index"
    assert run_in_process(capsys, "index", "build", "--model", saved_model, "--allow-untrained", "--corpus",
                          built_index.parent / "corpus.jsonl", "--out", index)[0] == 0
    outcome = run_in_process(capsys, "search", "--index", index, "--model", edited_dir, "--allow-untrained",
                             "--text", "document 1")
    assert_clear_in_process(outcome, "fingerprint")


def test_a_model_saved_before_the_processor_joined_the_fingerprint_keeps_its_fingerprint(tmp_path, saved_model):
    """Models (and so their indexes and caches) from before fingerprint scheme 2 still match."""
    from rematch import ReMatchModel

    old_dir = _copy_model(saved_model, tmp_path / "old", lambda m: _edit_json(
        m / "rematch_config.json", lambda meta: [meta.pop(key) for key in ("fingerprint_scheme", "checksums")]))
    old = ReMatchModel.from_pretrained(old_dir)
    assert old.fingerprint_scheme == 1
    reference = ReMatchModel.from_pretrained(saved_model)
    assert reference.fingerprint_scheme == 2
    reference.fingerprint_scheme = 1  # the formula of before: configuration and weights
    assert old.fingerprint() == reference.fingerprint()


def test_the_embedding_cache_keys_images_by_their_bytes(tmp_path):
    """An image swapped for another of the same size and modification time is encoded again."""
    from PIL import Image

    from rematch import ReMatchModel
    from rematch.encoding.cache import CachedEncoder

    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.bmp")  # uncompressed: the same size whatever the colour
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "b.bmp")
    assert (tmp_path / "a.bmp").stat().st_size == (tmp_path / "b.bmp").stat().st_size
    model = ReMatchModel.tiny(num_tokens=2)
    items = [Item(image=str(tmp_path / "a.bmp"))]
    first = CachedEncoder(model, tmp_path / "cache")
    red = first.encode(items, "document")
    stamp = (tmp_path / "a.bmp").stat()
    (tmp_path / "a.bmp").write_bytes((tmp_path / "b.bmp").read_bytes())  # same size ...
    os.utime(tmp_path / "a.bmp", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # ... same mtime
    second = CachedEncoder(model, tmp_path / "cache")
    blue = second.encode(items, "document")
    assert second.stats.encoded == 1 and second.stats.cached == 0
    assert not np.allclose(red, blue)
    third = CachedEncoder(model, tmp_path / "cache")
    third.encode(items, "document")
    assert third.stats.cached == 1  # unchanged bytes: served from the cache


def _heads(change):
    def mutate(model_dir: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(model_dir / "rematch_heads.safetensors"))
        change(tensors)
        save_file(tensors, str(model_dir / "rematch_heads.safetensors"))

    return mutate


def _other_models_file(name: str):
    def mutate(model_dir: Path) -> None:
        from rematch import ReMatchModel

        other = model_dir.parent / "other"
        ReMatchModel.tiny(num_tokens=2, seed=7).save_pretrained(other)
        (model_dir / name).write_bytes((other / name).read_bytes())

    return mutate


@pytest.mark.parametrize("damage,fragments", [
    (_heads(lambda t: t["query_tokens"].fill_(float("inf"))), ("rematch_heads.safetensors", "checksum")),
    (_heads(lambda t: t.update(query_tokens=t["query_tokens"].long())), ("rematch_heads.safetensors", "checksum")),
    (_other_models_file("rematch_heads.safetensors"), ("rematch_heads.safetensors", "not the file")),
    (_other_models_file("model.safetensors"), ("model.safetensors", "not the file")),
    (lambda m: (_without_checksums(m), _heads(lambda t: t["query_tokens"].fill_(float("nan")))(m)),
     ("query_tokens", "inf or NaN")),
    (lambda m: (_without_checksums(m), _heads(lambda t: t.update(document_tokens=t["document_tokens"].long()))(m)),
     ("document_tokens", "not floating point")),
    (lambda m: _edit_json(m / "rematch_config.json", lambda meta: meta["model"].update(max_text_tokens=512.0)),
     ("max_text_tokens", "integer")),
    (lambda m: _edit_json(m / "rematch_config.json", lambda meta: meta["model"].update(max_text_tokens="512")),
     ("max_text_tokens", "integer")),
    (lambda m: _edit_json(m / "rematch_config.json", lambda meta: meta["model"].update(dtype="float64")),
     ("rematch_config.json", "model.dtype")),
    (lambda m: _edit_json(m / "preprocessor_config.json", lambda c: c.update(patch_size=0)),
     ("preprocessor_config.json", "patch_size")),
], ids=["inf-heads", "int-heads", "heads-of-another-model", "backbone-of-another-model", "nan-heads-unrecorded",
        "int-heads-unrecorded", "float-max-text-tokens", "text-max-text-tokens", "dtype-float64", "patch-size-0"])
def test_a_model_that_would_give_wrong_vectors_is_refused_on_load(tmp_path, saved_model, capsys, damage, fragments):
    broken = _copy_model(saved_model, tmp_path / "broken", damage)
    items = tmp_path / "items.jsonl"
    items.write_text('{"text": "a red circle"}\n')
    outcome = run_in_process(capsys, "encode", "--model", broken, "--allow-untrained", "--input", items,
                             "--out", tmp_path / "v.npy")
    assert_clear_in_process(outcome, *fragments)
    assert not (tmp_path / "v.npy").exists()


def test_text_of_only_invisible_characters_is_refused_as_empty(tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    for text in ("\u200b\u200c\u200d", "\u202e\u2066 \u2069\ufeff", "<|image_1|>\u200b"):
        items.write_text('{"text": "fine"}\n' + json.dumps({"text": text}) + "\n")
        outcome = run_in_process(capsys, "encode", "--model", "tiny", "--allow-untrained", "--input", items,
                                 "--out", tmp_path / "v.npy")
        assert_clear_in_process(outcome, "row 1")
    items.write_text(json.dumps({"text": "a red circle \u200b\u202e"}) + "\n")  # visible text with them: fine
    assert run_in_process(capsys, "encode", "--model", "tiny", "--allow-untrained", "--input", items,
                          "--out", tmp_path / "v.npy")[0] == 0


def test_fifos_and_symlink_loops_in_a_corpus_folder_are_counted_and_reported(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.new("RGB", (40, 30), "red").save(folder / "a.png")
    os.mkfifo(folder / "pipe.png")
    os.symlink(folder / "loop.png", folder / "loop.png")
    status, lines = run_in_process(capsys, "index", "build", "--model", "tiny", "--allow-untrained", "--corpus",
                                   folder, "--out", tmp_path / "index")
    assert status == 0
    (note,) = [line for line in lines if "skipped" in line]
    assert "skipped 2 entries" in note and "pipe.png (a FIFO)" in note and "loop.png (a symlink loop)" in note
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["count"] == 1


@pytest.mark.parametrize("content,fragment", [("", "empty"), ("# only a comment\n", "empty")])
def test_an_empty_config_file_is_an_error(tmp_path, capsys, content, fragment):
    (tmp_path / "recipe.yaml").write_text(content)
    outcome = run_in_process(capsys, "train", "--config", tmp_path / "recipe.yaml", "--out", tmp_path / "run")
    assert_clear_in_process(outcome, "recipe.yaml", fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_info_never_prints_a_non_finite_value(tmp_path, saved_model, capsys, value):
    model = _copy_model(saved_model, tmp_path / "m")
    meta = (model / "rematch_config.json").read_text()
    (model / "rematch_config.json").write_text(meta.replace('"num_tokens": 2', f'"num_tokens": {value}', 1))
    outcome = run_in_process(capsys, "info", model)
    assert_clear_in_process(outcome, "rematch_config.json", value)
    assert value not in capsys.readouterr().out


# ------------------------------------------------------------------ issue 27: resuming a changed run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A one-step run (its final checkpoint at step 1) and the command that continues it."""
    from rematch.cli import main

    root = tmp_path_factory.mktemp("resume")
    assert main(["data", "synth", "--out", str(root / "world"), "--train-rows", "8", "--eval-queries", "1",
                 "--candidates", "4", "--image-size", "28"]) == 0
    args = ["train", "--no-progress", "--train.batch_size", "2", "--model.num_tokens", "2", "--data",
            str(root / "world"), "--out", str(root / "run")]
    assert main([*args, "--steps", "1"]) == 0
    return root / "run", args


def _checkpoint_edit(change):
    """Edit step 1's state.json the way a careful hand would: its manifest's sizes fixed too."""
    def mutate(run: Path) -> None:
        checkpoint = run / "checkpoints" / "step-00000001"
        state = json.loads((checkpoint / "state.json").read_text())
        change(state)
        (checkpoint / "state.json").write_text(json.dumps(state))
        size = (checkpoint / "state.json").stat().st_size
        _edit_json(checkpoint / "MANIFEST.json", lambda manifest: manifest["files"].update({"state.json": size}))

    return mutate


def _flip_weight_byte(run: Path) -> None:
    weights = run / "checkpoints" / "step-00000001" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,fragments", [
    (_flip_weight_byte, ("trainable.safetensors", "changed after the checkpoint was saved")),
    (_checkpoint_edit(lambda state: state.update(step=5)), ("state.json", "step 5 disagrees")),
    (_checkpoint_edit(lambda state: state.update(data_state="garbage")), ("state.json", "'data_state'")),
    (_checkpoint_edit(lambda state: state.update(data_state={"format": 1, "subsets": 3})),
     ("state.json", "data_state")),
], ids=["flipped-weight-byte", "step-disagrees", "data-state-text", "data-state-garbage"])
def test_resume_refuses_a_checkpoint_that_changed(tmp_path, finished_run, capsys, damage, fragments):
    import shutil

    run, args = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    damage(copy)
    if "changed" not in fragments[-1]:  # a state edit fixed in the manifest: only the checksum is left to see it
        _edit_json(copy / "checkpoints" / "step-00000001" / "MANIFEST.json", lambda m: m.pop("checksums"))
    outcome = run_in_process(capsys, *[str(copy) if a == str(run) else a for a in args], "--steps", "2", "--resume")
    assert_clear_in_process(outcome, *fragments)


def test_a_full_disk_while_writing_a_checkpoint_is_one_line(tmp_path, finished_run):
    """The file-size limit makes every write past 1 MB fail as a full disk does (EFBIG instead of ENOSPC)."""
    import resource
    import signal

    run, args = finished_run
    world = args[args.index("--data") + 1]

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "rematch.cli", "train", "--no-progress", "--steps", "2",
                             "--train.save_every", "1", "--train.batch_size", "2", "--model.num_tokens", "2",
                             "--data", world, "--out", str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=TIMEOUT, env=env, preexec_fn=limit)
    assert_clear_error(result, "cannot write checkpoint", "step-00000001", "--resume")


# ------------------------------------------------------------------ issue 27: tracebacks for user errors


def test_a_corrupt_embedding_cache_is_named(tmp_path, saved_model, capsys):
    data = tmp_path / "world"
    assert run_in_process(capsys, "data", "synth", "--out", data, "--train-rows", "0", "--eval-queries", "1",
                          "--candidates", "4", "--image-size", "28")[0] == 0
    evaluate = ["eval", "mmeb", "--model", saved_model, "--allow-untrained", "--data", data, "--no-plot",
                "--cache-dir", tmp_path / "cache"]
    assert run_in_process(capsys, *evaluate, "--out", tmp_path / "a")[0] == 0
    (cache_file,) = (tmp_path / "cache").glob("*.sqlite3")
    cache_file.write_bytes(b"this is not a database" * 100)
    outcome = run_in_process(capsys, *evaluate, "--out", tmp_path / "b")
    assert_clear_in_process(outcome, cache_file.name, "delete the file")


V2_SUMMARY = {"all": {"score": 0.5, "tasks": 1}, "modalities": {"image": {"score": 0.5}}, "tasks": {}}


@pytest.mark.parametrize("summary,fragment", [
    (V2_SUMMARY, "eval mmeb-v2"),
    ({"subsets": {"A": {"hit@1": "high"}}, "groups": {}}, "hit@1 must be a number"),
    ({"subsets": {"A": 3}, "groups": {}}, "'A' is not an object"),
    ({"subsets": {}, "groups": {"overall": {"hit@1": 0.5, "subsets": 4}}}, "'subsets' must be a list"),
], ids=["v2-summary", "text-metric", "row-number", "group-subsets-number"])
def test_comparing_or_exporting_with_a_summary_of_another_shape_is_one_line(tmp_path, saved_model, capsys, summary,
                                                                              fragment):
    for name in ("mine", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "other" / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "mine" / "summary.json").write_text(json.dumps({"subsets": {}, "groups": {}}))
    outcome = run_in_process(capsys, "eval", "mmeb", "--out", tmp_path / "mine", "--compare", tmp_path / "other")
    assert_clear_in_process(outcome, "summary.json", fragment)
    outcome = run_in_process(capsys, "export", saved_model, tmp_path / "export", "--allow-untrained",
                             "--eval", tmp_path / "other")
    assert_clear_in_process(outcome, "summary.json", fragment)
    assert not (tmp_path / "export").exists()


def test_an_hnsw_graph_of_one_link_is_refused(tmp_path):
    """FAISS segfaults building an HNSW graph with M=1: a subprocess, so a crash fails only this test."""
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"document {i}"}) + "\n"
                                                   for i in range(4)))
    result = run_cli("index", "build", "--model", "tiny", "--allow-untrained", "--corpus", tmp_path / "corpus.jsonl",
                     "--out", tmp_path / "index", "--index-type", "hnsw", "--hnsw-m", "1")
    assert_clear_error(result, "hnsw")
    assert not (tmp_path / "index").exists()


def test_all_loss_weights_zero_is_refused_before_anything_runs(tmp_path, capsys):
    outcome = run_in_process(capsys, "train", "--out", tmp_path / "run", "--loss.contrastive", "0",
                             "--loss.orthogonality", "0", "--loss.matching", "0")
    assert_clear_in_process(outcome, "loss.contrastive", "all 0")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ issue 27: bounds and messages


@pytest.mark.parametrize("args,fragment", [
    (["train", "--steps", str(2**70)], "train.steps must be within 1..1000000000"),
    (["train", "--train.steps", str(2**70)], "train.steps must be within"),
    (["pretrain", "--config", "configs/pretrain-tiny.yaml", "--train.steps", str(2**70)], "train.steps"),
    (["train", "--train.batch_size", str(10**9)], "train.batch_size must be within"),
    (["demo", "--quick", "--steps", str(10**23)], "--steps"),
], ids=["train-steps", "train-steps-override", "pretrain-steps", "batch-size-huge", "demo-steps"])
def test_runs_without_end_are_refused_before_they_start(tmp_path, capsys, monkeypatch, args, fragment):
    from tests.support import REPO

    monkeypatch.chdir(REPO)
    outcome = run_in_process(capsys, *args, "--out", tmp_path / "out")
    assert_clear_in_process(outcome, fragment)
    assert not (tmp_path / "out").exists()


def test_a_busy_serve_port_is_one_line(tmp_path):
    import importlib.util
    import socket

    if importlib.util.find_spec("uvicorn") is None:
        pytest.skip("the serve extra is not installed")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        result = run_cli("serve", "--model", "tiny", "--allow-untrained", "--port", str(port))
    assert_clear_error(result, f"port {port} on 127.0.0.1 is already in use")
    assert "model tiny" not in result.stdout  # refused before the model loads


def test_a_batch_larger_than_the_training_data_is_refused(tmp_path, finished_run, capsys):
    run, args = finished_run
    world = args[args.index("--data") + 1]
    outcome = run_in_process(capsys, "train", "--no-progress", "--steps", "1", "--train.batch_size", "5000",
                             "--data", world, "--out", tmp_path / "run")
    assert_clear_in_process(outcome, "train.batch_size 5000", "larger than the training data (8 rows)")


def test_a_huge_sparse_config_file_is_not_read_whole(tmp_path, saved_model, capsys):
    big = tmp_path / "recipe.yaml"
    with open(big, "wb") as handle:
        handle.truncate(3 << 30)  # 3 GB, sparse: no disk used
    assert_clear_in_process(run_in_process(capsys, "train", "--config", big, "--out", tmp_path / "run"),
                            "recipe.yaml", "far more than a config file")
    model = _copy_model(saved_model, tmp_path / "m")
    with open(model / "rematch_config.json", "r+b") as handle:
        handle.truncate(3 << 30)
    assert_clear_in_process(run_in_process(capsys, "info", model), "rematch_config.json", "bytes")


@pytest.mark.parametrize("flags,fragment", [
    (["--min-pixels", "5000", "--max-pixels", "4000"], "--min-pixels (5000) > --max-pixels (4000)"),
    (["--input-limits", "model", "--min-pixels", "5000", "--max-pixels", "4000"], "--min-pixels (5000)"),
    (["--max-pixels", "1"], "--max-pixels must be >= 784"),
], ids=["min-above-max", "min-above-max-model-limits", "max-pixels-1"])
def test_input_limit_flags_end_in_one_line(tmp_path, capsys, flags, fragment):
    outcome = run_in_process(capsys, "eval", "mmeb", "--model", "tiny", "--allow-untrained", "--data",
                             tmp_path / "nowhere", "--out", tmp_path / "out", *flags)
    assert_clear_in_process(outcome, fragment)
    assert not (tmp_path / "out").exists()
