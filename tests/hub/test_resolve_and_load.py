"""Loading models by path or hub id, refusing untrained heads, and the default device.

Hub tests run offline against a real Hugging Face cache layout built in ``tmp_path``
(``models--org--name/{blobs,snapshots/<commit>,refs/main}``), with ``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE=1`` set through monkeypatch (restored after each test).
"""

from __future__ import annotations

import hashlib
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rematch import ReMatchModel
from rematch.cli import main
from rematch.devices import default_device, resolve_device
from rematch.hub.resolve import ModelNotFoundError, is_local_spec, resolve_model_dir
from rematch.serialization import HEADS_NAME, CheckpointMismatchError, NotAReMatchModelError

SMALL = {"max_pixels": 56 * 56}
ITEMS = [{"text": "a large red circle"}, {"text": "a small blue star", "instruction": "Find the caption:"}]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def trained_looking_model(k: int = 4, seed: int = 3) -> ReMatchModel:
    """A tiny model whose heads differ from a fresh initialisation, so loading them is what is tested."""
    model = ReMatchModel.tiny(num_tokens=k, seed=seed, **SMALL)
    with torch.no_grad():
        model.query_tokens.add_(0.5)
        model.document_tokens.mul_(-1)
        model.projector.output_norm.mul_(2)
    return model


def put_in_hub_cache(cache: Path, repo_id: str, source: Path, commit: str = COMMIT) -> Path:
    """Lay ``source``'s files out as huggingface_hub does: content-addressed blobs, a snapshot of
    relative symlinks to them, and ``refs/main`` naming the commit. Returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # no newline: huggingface_hub reads the file verbatim
    return snapshot


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---------------------------------------------------------------------------- device


def test_default_device_prefers_cuda_and_the_torchrun_rank():
    assert default_device(cuda_available=False, environ={}) == "cpu"
    assert default_device(cuda_available=False, environ={"LOCAL_RANK": "2"}) == "cpu"
    assert default_device(cuda_available=True, environ={}) == "cuda"
    assert default_device(cuda_available=True, environ={"LOCAL_RANK": "3"}) == "cuda:3"
    with pytest.raises(ValueError, match="LOCAL_RANK='x'"):
        default_device(cuda_available=True, environ={"LOCAL_RANK": "x"})
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) == default_device()


def test_api_loaders_use_the_default_device(tmp_path):
    expected = torch.device(default_device()).type
    assert ReMatchModel.load("tiny").device.type == expected
    ReMatchModel.tiny(num_tokens=2, **SMALL).save_pretrained(tmp_path / "m")
    assert ReMatchModel.from_pretrained(tmp_path / "m").device.type == expected
    assert ReMatchModel.from_pretrained(tmp_path / "m", device="cpu").device.type == "cpu"


# ---------------------------------------------------------------------------- local specs


def test_local_and_hub_specs_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for local in ("./x", "/abs/x", "~/x", "runs/modle", "runs"):
        assert is_local_spec(local), local
    for hub in ("Qwen/Qwen2-VL-2B-Instruct", "org/name@v1"):
        assert not is_local_spec(hub), hub


def test_a_typo_in_a_local_path_fails_at_once_naming_it(tmp_path, monkeypatch, cli_error):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a hub lookup would be tried (and be slow) if the rule were wrong
    with pytest.raises(ModelNotFoundError, match=r"no model directory at runs/demo/modle \(runs/demo exists, "
                                                 r"modle does not\)"):
        resolve_model_dir("runs/demo/modle")
    with pytest.raises(ModelNotFoundError, match="not a hub id of the form org/name"):
        resolve_model_dir("modle")
    with pytest.raises(ModelNotFoundError, match="no model directory at"):
        ReMatchModel.from_pretrained(tmp_path / "nowhere" / "model")
    assert cli_error(["eval", "mmeb", "--model", "runs/demo/modle", "--data", "data", "--out", "eval"]).startswith(
        "rematch: error: no model directory at runs/demo/modle")


# ---------------------------------------------------------------------------- heads are never silently random


def save_bare_backbone(directory: Path, seed: int = 1) -> ReMatchModel:
    """A Qwen-VL checkpoint with no ReMatch files, as a hub backbone repository looks."""
    model = ReMatchModel.tiny(num_tokens=2, seed=seed, **SMALL)
    model.backbone.save_pretrained(directory)
    model.processor.save_pretrained(directory)
    return model


def test_a_bare_backbone_is_refused_unless_fresh_heads_are_asked_for(tmp_path):
    save_bare_backbone(tmp_path / "backbone")
    with pytest.raises(NotAReMatchModelError, match=r"bare backbone.*from_backbone\(.*new_heads=True"):
        ReMatchModel.from_pretrained(tmp_path / "backbone")
    fresh = ReMatchModel.from_pretrained(tmp_path / "backbone", new_heads=True, k=2, **SMALL)
    assert fresh.heads_source is None and fresh.num_tokens == 2
    assert fresh.config.backbone == str(tmp_path / "backbone")
    assert np.isfinite(fresh.encode(ITEMS)).all()
    with pytest.raises(TypeError, match="unexpected keyword"):
        ReMatchModel.from_pretrained(tmp_path / "backbone", new_heads=True, num_token=2)

    (tmp_path / "backbone" / HEADS_NAME).write_bytes(b"")  # heads without their config: a broken copy
    for new_heads in (False, True):
        with pytest.raises(NotAReMatchModelError, match=r"has rematch_heads.safetensors but no rematch_config"):
            ReMatchModel.from_pretrained(tmp_path / "backbone", new_heads=new_heads)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAReMatchModelError, match="not a model directory"):
        ReMatchModel.from_pretrained(tmp_path / "empty")


def test_heads_source_records_where_the_heads_came_from(tmp_path):
    model = trained_looking_model(k=2)
    assert model.heads_source is None  # freshly initialised (then perturbed in memory)
    model.save_pretrained(tmp_path / "m")
    loaded = ReMatchModel.from_pretrained(tmp_path / "m")
    assert loaded.heads_source == str(tmp_path / "m")
    assert torch.equal(loaded.query_tokens.cpu(), model.query_tokens)
    with pytest.raises(CheckpointMismatchError, match="new_heads=True would throw them away"):
        ReMatchModel.from_pretrained(tmp_path / "m", new_heads=True)


@pytest.fixture()
def command_inputs(tmp_path) -> Path:
    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"id": str(i), **item}) + "\n"
                                                  for i, item in enumerate(ITEMS)))
    (tmp_path / "qrels.tsv").write_text("0\t1\t1\n")
    return tmp_path


def commands(files: Path) -> dict[str, list[str]]:
    items = str(files / "items.jsonl")
    return {
        "encode": ["encode", "--model", "tiny", "--input", items, "--out", str(files / "v.npy")],
        "index build": ["index", "build", "--model", "tiny", "--corpus", items, "--out", str(files / "index")],
        "search": ["search", "--index", str(files / "index"), "--model", "tiny", "--text", "x"],
        "eval mmeb": ["eval", "mmeb", "--model", "tiny", "--data", str(files / "no-data"), "--out",
                      str(files / "eval")],
        "eval retrieval": ["eval", "retrieval", "--model", "tiny", "--queries", items, "--corpus", items,
                           "--qrels", str(files / "qrels.tsv"), "--no-cache", "--json"],
    }


@pytest.mark.parametrize("command", ["encode", "index build", "search", "eval mmeb", "eval retrieval"])
def test_commands_that_embed_refuse_untrained_heads(command, command_inputs, cli_error):
    error = cli_error(commands(command_inputs)[command])
    assert re.match(r"^rematch: error: model 'tiny' has untrained, randomly initialised ReMatch heads.*--allow-untrained",
                    error), error


def test_allow_untrained_lets_the_commands_run(command_inputs, capsys):
    runs = commands(command_inputs)
    for command in ("encode", "index build", "search", "eval retrieval"):
        assert main(runs[command] + ["--allow-untrained"]) == 0, command
    assert np.load(command_inputs / "v.npy").shape[0] == len(ITEMS)
    assert "recall@1" in capsys.readouterr().out


# ---------------------------------------------------------------------------- hub ids


def test_a_hub_id_loads_the_saved_model_from_the_cache(tmp_path, offline_hub, capsys):
    from huggingface_hub import scan_cache_dir

    model = trained_looking_model()
    model.save_pretrained(tmp_path / "saved")
    snapshot = put_in_hub_cache(offline_hub, "org/name", tmp_path / "saved")
    assert [repo.repo_id for repo in scan_cache_dir(offline_hub).repos] == ["org/name"]  # a layout the hub accepts

    by_path = ReMatchModel.from_pretrained(tmp_path / "saved")
    by_id = ReMatchModel.from_pretrained("org/name")
    assert by_id.heads_source == "org/name" and by_id.config == by_path.config
    assert torch.equal(by_id.query_tokens.cpu(), model.query_tokens)
    for role in ("query", "document"):
        assert cosines(by_id.encode(ITEMS, role=role), by_path.encode(ITEMS, role=role)).min() >= 0.9999
    assert resolve_model_dir("org/name") == snapshot
    assert resolve_model_dir(f"org/name@{COMMIT}") == snapshot
    assert ReMatchModel.from_pretrained("org/name", revision=COMMIT).heads_source == f"org/name@{COMMIT}"
    assert ReMatchModel.load("org/name").heads_source == "org/name"
    assert main(["info", "org/name", "--json"]) == 0 and '"num_tokens": 4' in capsys.readouterr().out

    with pytest.raises(ModelNotFoundError, match=r"org/name@v2.*not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        ReMatchModel.from_pretrained("org/name@v2")
    with pytest.raises(ModelNotFoundError, match=r"org/missing.*HF_HUB_OFFLINE"):
        ReMatchModel.from_pretrained("org/missing")


def test_a_bare_backbone_by_hub_id_is_refused_too(tmp_path, offline_hub, cli_error):
    save_bare_backbone(tmp_path / "backbone")
    put_in_hub_cache(offline_hub, "org/backbone", tmp_path / "backbone")
    with pytest.raises(NotAReMatchModelError, match=r"org/backbone \(.*\) is a bare backbone"):
        ReMatchModel.from_pretrained("org/backbone")
    error = cli_error(["eval", "mmeb", "--model", "org/backbone", "--data", str(tmp_path), "--out", str(tmp_path / "e")])
    assert re.match(r"^rematch: error: org/backbone .* is a bare backbone", error), error
    fresh = ReMatchModel.from_pretrained("org/backbone", new_heads=True, k=2, **SMALL)
    assert fresh.config.backbone == "org/backbone" and fresh.heads_source is None
    pinned = ReMatchModel.from_pretrained("org/backbone", revision=COMMIT, new_heads=True, k=2, **SMALL)
    assert pinned.config.backbone == f"org/backbone@{COMMIT}"  # a LoRA base recorded at its exact commit


def test_lora_model_whose_base_is_a_hub_id(tmp_path, offline_hub):
    save_bare_backbone(tmp_path / "backbone", seed=4)
    put_in_hub_cache(offline_hub, "org/base", tmp_path / "backbone")
    model = ReMatchModel.from_pretrained("org/base", new_heads=True, k=2, **SMALL)
    model.enable_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, parameter in model.backbone.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "rematch_config.json").read_text())["model"]["backbone"] == "org/base"
    put_in_hub_cache(offline_hub, "org/lora", tmp_path / "lora")

    expected = model.encode(ITEMS)
    for spec in (tmp_path / "lora", "org/lora"):
        loaded = ReMatchModel.from_pretrained(spec)
        assert hasattr(loaded.backbone, "peft_config")
        assert cosines(loaded.encode(ITEMS), expected).min() >= 0.9999, spec

    os.rename(offline_hub / "models--org--base", offline_hub / "gone")
    with pytest.raises(ModelNotFoundError, match=r"base model of its LoRA adapter, 'org/base', is not available"):
        ReMatchModel.from_pretrained("org/lora")


def test_the_cli_loads_a_hub_id_offline(tmp_path):
    """A fresh process with the cache and offline mode in its environment, as a user would run it."""
    model = trained_looking_model()
    model.save_pretrained(tmp_path / "saved")
    put_in_hub_cache(tmp_path / "cache", "org/name", tmp_path / "saved")
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = ["encode", "--model", "org/name", "--input", str(tmp_path / "items.jsonl"), "--role", "document",
               "--out", str(tmp_path / "v.npy")]
    done = subprocess.run([sys.executable, "-m", "rematch.cli", *command], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    by_path = ReMatchModel.from_pretrained(tmp_path / "saved", device="cpu").encode(ITEMS, role="document")
    assert cosines(np.load(tmp_path / "v.npy"), by_path).min() >= 0.9999
