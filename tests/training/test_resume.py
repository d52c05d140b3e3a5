"""Checkpoints survive SIGKILL (mid-run and mid-save) and resume to exactly the uninterrupted result.

Every run here (the uninterrupted reference, the killed one and the resumed one) is a CLI
subprocess with the same pinned thread count: float reductions depend on how many threads
split them, so comparing at 1e-6 is only meaningful between runs that use the same count,
whatever the test process itself happens to be set to.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.processes import run_with_deadline
from rematch.training.checkpoint import MANIFEST, TRAINABLE, latest_checkpoint, list_checkpoints

STEPS = 6
OVERRIDES = ["train.steps=6", "train.batch_size=4", "train.save_every=2", "train.keep_last=5",
             "data.builtin_train_rows=40", "model.num_tokens=4", "loss.matching_samples=2", "model.max_pixels=3136",
             "lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.dropout=0.1", "train.warmup_ratio=0.2"]


THREADS = "2"


def cli_command(out: Path, resume: bool = False) -> list[str]:
    flags = []
    for override in OVERRIDES + (["train.resume=true"] if resume else []):
        key, value = override.split("=", 1)
        flags += [f"--{key}", value]
    return [sys.executable, "-m", "rematch.cli", "train", "--config", "configs/demo-tiny.yaml", "--out", str(out),
            "--no-progress", *flags]


def run_env(**extra: str) -> dict[str, str]:
    """The environment of every training subprocess: the same thread count for all of them."""
    return dict(os.environ, OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS, **extra)


def run_cli(out: Path, resume: bool = False) -> subprocess.CompletedProcess:
    completed = run_with_deadline(cli_command(out, resume), env=run_env(), text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{STEPS:08d}" / TRAINABLE))


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_cli(out)
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    expected, got = final_weights(reference), final_weights(out)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert [row["step"] for row in losses(out)] == list(range(1, STEPS + 1))  # the curve continues, no repeats
    for a, b in zip(losses(out), losses(reference)):
        for term in ("loss", "contrastive", "orthogonality", "matching"):
            assert a[term] == pytest.approx(b[term], abs=1e-5), (a["step"], term)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(tmp_path, reference):
    out = tmp_path / "killed"
    process = subprocess.Popen(cli_command(out), env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: (out / "checkpoints" / "step-00000002" / MANIFEST).is_file(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "model").exists(), "the run finished before it could be killed"
    assert latest_checkpoint(out / "checkpoints", log=lambda *_: None).name in ("step-00000002", "step-00000004")
    run_cli(out, resume=True)
    assert_same_run(out, reference)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_leaves_the_previous_one_and_resumes(tmp_path, reference):
    out = tmp_path / "killed-in-save"
    completed = run_with_deadline(cli_command(out), env=run_env(REMATCH_KILL_DURING_SAVE="4"))
    assert completed.returncode == -signal.SIGKILL
    names = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert names == ["step-00000002"]  # step 4 never appeared under its real name
    assert list((out / "checkpoints").glob(".step-00000004.tmp-*"))  # the half-written save, left aside
    output = run_cli(out, resume=True)
    messages = (output.stdout + output.stderr).splitlines()
    assert any("interrupted checkpoint save" in m for m in messages)
    assert any("resumed from" in m and "step-00000002" in m for m in messages)
    assert_same_run(out, reference)


def test_a_corrupt_checkpoint_is_reported_and_skipped(tmp_path, reference):
    root = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints" / "step-00000004", root / "step-00000004")
    shutil.copytree(reference / "checkpoints" / "step-00000006", root / "step-00000006")
    damaged = root / "step-00000006" / TRAINABLE
    damaged.write_bytes(damaged.read_bytes()[:100])
    partial = root / "step-00000008"
    partial.mkdir()
    (partial / TRAINABLE).write_bytes(b"")
    messages = []
    assert latest_checkpoint(root, log=messages.append).name == "step-00000004"
    assert any("step-00000008" in m and "MANIFEST" in m for m in messages)
    assert any("step-00000006" in m and "bytes" in m for m in messages)
