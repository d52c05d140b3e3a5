"""A run directory is reused only to resume the same run with the same settings, or explicitly overwritten."""

from __future__ import annotations

import json
import shutil

import pytest

from rematch.config import load_config
from rematch.training.checkpoint import list_checkpoints
from rematch.training.loop import train
from rematch.training.run_directory import RUN_FORMAT, RunDirectoryError


SMALL = ["train.steps=2", "train.batch_size=2", "train.save_every=1", "train.keep_last=5", "train.warmup_ratio=0",
         "data.builtin_train_rows=20", "model.num_tokens=2", "loss.matching_samples=1", "model.max_pixels=3136",
         "train.plot=false"]


def config(out, *overrides):
    return load_config("configs/demo-tiny.yaml", [f"train.out={out}", *SMALL, *overrides])


def run(out, *overrides):
    return train(config(out, *overrides), show_progress=False, log=lambda *_: None)


def snapshot(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "data" not in p.relative_to(out).parts}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "first"
    run(out)
    return out


def test_a_new_run_in_an_old_run_directory_is_refused_and_changes_nothing(finished):
    before = snapshot(finished)
    with pytest.raises(RunDirectoryError, match="holds a previous run; pass --resume .* or --overwrite"):
        run(finished, "train.lr=0.001")
    assert snapshot(finished) == before


def test_overwrite_starts_over(tmp_path, finished):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("the user's own file")
    old_id = json.loads((out / "run.json").read_text())["run_id"]
    run(out, "train.overwrite=true", "train.steps=1", "train.save_every=0")
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000001"]
    assert [json.loads(line)["step"] for line in (out / "losses.jsonl").read_text().splitlines()] == [1]
    assert json.loads((out / "run.json").read_text())["run_id"] != old_id
    assert (out / "notes.txt").read_text() == "the user's own file"  # only the run's own outputs go


def test_resuming_with_other_settings_is_an_error_unless_accepted(tmp_path, finished):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoints" / "step-00000002")  # resume from step 1
    with pytest.raises(RunDirectoryError, match=r"train.lr: 0.0003 -> 0.001"):
        run(out, "train.resume=true", "train.lr=0.001")
    messages = []
    train(config(out, "train.resume=true", "train.lr=0.001", "train.resume_with_changes=true"),
          show_progress=False, log=messages.append)
    assert any("changed settings" in m and "train.lr" in m for m in messages)
    assert any("resumed from" in m for m in messages)


def test_a_checkpoint_past_the_steps_or_of_another_run_is_refused(tmp_path, finished):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    with pytest.raises(RunDirectoryError, match="at step 2, past train.steps=1"):
        run(out, "train.resume=true", "train.steps=1")
    (out / "run.json").write_text(json.dumps({"run_id": "someoneelse", "format": RUN_FORMAT}))
    with pytest.raises(RunDirectoryError, match="belongs to run .* not to run someoneelse"):
        run(out, "train.resume=true")


OLDER = r"was written by an older rematch \(run format 1, this one writes \d+\) and cannot be resumed"


def test_a_run_written_before_the_run_format_is_not_resumed(tmp_path, finished, capsys):
    """A run directory of an older rematch (``run.json`` without a format, as it was written
    before train and pretrain shared one loop) is refused on resume, in one line."""
    from rematch.cli import main

    out = tmp_path / "old"
    shutil.copytree(finished, out)
    (out / "run.json").write_text(json.dumps({"run_id": "0123456789ab"}))  # what an older rematch wrote
    before = snapshot(out)
    with pytest.raises(RunDirectoryError, match=OLDER):
        run(out, "train.resume=true")
    overrides = [part for item in SMALL for part in ("--" + item.split("=")[0], item.split("=")[1])]
    assert main(["train", "--config", "configs/demo-tiny.yaml", "--out", str(out), "--resume", "--no-progress",
                 *overrides]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("rematch: error:") and "older rematch" in error and "--overwrite" in error
    assert len(error.splitlines()) == 1
    assert snapshot(out) == before


def test_a_checkpoint_written_before_the_run_format_is_not_resumed(tmp_path, finished):
    """The checkpoint records the format too: an old checkpoint (no format, a config hash of the
    old settings layout) under a current run.json is refused the same way."""
    out = tmp_path / "old-checkpoint"
    shutil.copytree(finished, out)
    for checkpoint in list_checkpoints(out / "checkpoints"):
        state_file = checkpoint / "state.json"
        state = json.loads(state_file.read_text())
        del state["extra"]["run_format"]
        state["extra"]["config_hash"] = "0" * 16
        state_file.write_text(json.dumps(state))  # same size or not, the manifest must still match
        manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
        manifest["files"]["state.json"] = state_file.stat().st_size
        manifest.pop("checksums")  # an old checkpoint recorded sizes only
        (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirectoryError, match=r"step-00000002 " + OLDER):
        run(out, "train.resume=true")

