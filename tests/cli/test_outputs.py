"""Nothing a command writes replaces a user's files (issue 27; README, "Command line").

For every command with an output path: a folder of the user's holding a file (or folder)
under each of that command's output names, and an unrelated file beside them, comes through
a run unchanged -- without ``--overwrite``, and with it (and ``--resume``) where the command
has the flag. Then the other half of the rule: a command writes into its own earlier output
(marked by ``.rematch-output.json``, or recognised from before markers), replaces only what
it recorded writing there, and leaves what the user put beside it.

Commands run in this process (:func:`tests.support.cli.run_in_process`) on tiny real models.
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

import numpy as np
import pytest
from tests.support import REPO
from tests.support.cli import assert_clear_in_process, run_in_process, tree_digest

from rematch.demo.pipeline import DEMO_OUTPUTS
from rematch.outputs import MARKER
from rematch.training.run_directory import RUN_OUTPUTS

SUBSETS = ("ShapesCLS", "ShapesGround", "ShapesI2T", "ShapesT2I", "ShapesVQA")
SYNTH = ("--train-rows", "8", "--eval-queries", "2", "--candidates", "4", "--image-size", "28")
MODEL_FILES = ("config.json", "model.safetensors", "rematch_config.json", "rematch_heads.safetensors",
               "tokenizer.json", "preprocessor_config.json", "README.md")
#: Output names that are folders (the user's stand-in is a folder with a file in it).
FOLDERS = {"images", "visdoc-tasks", "model", "checkpoints", "tensorboard", "data", "runs", "cache", "index",
           "eval-video-pages", ".mining", "shards", *SUBSETS}
TRAIN = ("--no-progress", "--steps", "1", "--train.batch_size", "2", "--model.num_tokens", "2")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny saved model, one with LoRA, a shapes world (with pages) and small retrieval files."""
    from rematch import ReMatchModel
    from rematch.cli import main

    root = tmp_path_factory.mktemp("outputs-inputs")
    assert main(["tiny", "--out", str(root / "model"), "--num-tokens", "2"]) == 0
    lora = ReMatchModel.tiny(num_tokens=2)
    lora.enable_lora(r=2, alpha=4)
    lora.save_pretrained(root / "lora")
    assert main(["data", "synth", "--out", str(root / "world"), *SYNTH, "--pages", "2"]) == 0
    (root / "corpus.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"document {i}"}) + "\n"
                                               for i in range(4)))
    (root / "items.jsonl").write_text('{"text": "a red circle"}\n{"text": "a blue square"}\n')
    (root / "queries.jsonl").write_text('{"id": "q0", "text": "document 1"}\n')
    (root / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td1\t1\n")
    return {"M": root / "model", "L": root / "lora", "W": root / "world", "C": root / "corpus.jsonl",
            "E": root / "items.jsonl", "Q": root / "queries.jsonl", "QR": root / "qrels.tsv"}


#: (command line with {OUT} and the inputs' keys, the command's output names, the flags that
#: must not touch the user's files either).
COMMANDS = {
    "eval mmeb": ("eval mmeb --model {M} --allow-untrained --data {W} --out {OUT} --no-cache",
                  [f"{s}.json" for s in SUBSETS] + ["summary.json", "summary.md", "summary.png"], ["--overwrite"]),
    "eval mmeb-v2": ("eval mmeb-v2 --model {M} --allow-untrained --data {W} --out {OUT} --modalities visdoc "
                     "--no-cache", ["ShapesPages.json", "summary.json", "summary.md"], ["--overwrite"]),
    "eval retrieval": ("eval retrieval --model {M} --allow-untrained --queries {Q} --corpus {C} --qrels {QR} "
                       "--out {OUT} --no-cache", ["retrieval.json"], []),
    "eval generative": ("eval generative --model tiny-pretrained --scenes 1 --out {OUT}", ["generative.json"], []),
    "demo": ("demo --quick --out {OUT}", list(DEMO_OUTPUTS), []),
    "mine": ("mine --random --data {W} --out {OUT}", list(SUBSETS) + ["mining_report.json", ".mining"], []),
    "data synth": ("data synth --out {OUT} " + " ".join(SYNTH),
                   ["manifest.json", "images", *SUBSETS], ["--overwrite"]),
    "tiny": ("tiny --out {OUT} --num-tokens 2", list(MODEL_FILES), ["--overwrite"]),
    "merge-lora": ("merge-lora {L} {OUT}", list(MODEL_FILES), ["--overwrite"]),
    "train": ("train --data {W} --out {OUT} " + " ".join(TRAIN), list(RUN_OUTPUTS), ["--overwrite", "--resume"]),
    "pretrain": ("pretrain --config configs/pretrain-tiny.yaml --out {OUT} --no-progress "
                 "--train.batch_size 2", list(RUN_OUTPUTS), ["--overwrite", "--resume"]),
    "index build": ("index build --model {M} --allow-untrained --corpus {C} --out {OUT}",
                    ["manifest.json", "index.faiss", "items.jsonl", "shards"], ["--overwrite"]),
    "export": ("export {M} {OUT} --allow-untrained", list(MODEL_FILES), ["--overwrite"]),
}


def users_folder(folder: Path, names: list[str]) -> Path:
    """A folder of the user's: their own file (or folder) under each output name, and notes beside."""
    folder.mkdir()
    for name in names:
        if name in FOLDERS:
            (folder / name).mkdir()
            (folder / name / "mine.txt").write_text(f"the user's own {name}\n")
        else:
            (folder / name).write_text(f"the user's own {name}\n")
    (folder / "notes.txt").write_text("unrelated notes\n")
    return folder


def command_line(template: str, inputs: dict[str, Path], out: Path) -> list[str]:
    return template.format(OUT=out, **inputs).split()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_users_files_under_every_output_name_survive(tmp_path, inputs, capsys, monkeypatch, command):
    monkeypatch.chdir(REPO)  # the pretrain recipe's relative path
    template, names, flags = COMMANDS[command]
    folder = users_folder(tmp_path / "proj", names)
    before = tree_digest(folder)
    args = command_line(template, inputs, folder)
    assert_clear_in_process(run_in_process(capsys, *args), str(folder))
    assert tree_digest(folder) == before
    for flag in flags:  # --overwrite replaces what rematch wrote, never these; --resume resumes only a run
        assert_clear_in_process(run_in_process(capsys, *args, flag), str(folder))
        assert tree_digest(folder) == before, flag
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # no hidden .tmp / .old left beside it


def test_encode_refuses_an_existing_file_and_overwrite_replaces_only_it(tmp_path, inputs, capsys):
    folder = tmp_path / "proj"
    folder.mkdir()
    np.save(folder / "vectors.npy", np.arange(6.0).reshape(2, 3))  # the user's own array
    (folder / "notes.txt").write_text("unrelated notes\n")
    before = tree_digest(folder)
    args = ["encode", "--model", inputs["M"], "--allow-untrained", "--input", inputs["E"],
            "--out", folder / "vectors.npy"]
    assert_clear_in_process(run_in_process(capsys, *args), "vectors.npy", "--overwrite")
    assert tree_digest(folder) == before
    assert run_in_process(capsys, *args, "--overwrite")[0] == 0
    assert np.load(folder / "vectors.npy").shape == (2, 128)
    assert (folder / "notes.txt").read_text() == "unrelated notes\n"


# ---------------------------------------------------------------------- a command's own output


def test_an_evaluation_reruns_into_its_own_output_and_leaves_the_users_files_beside_it(tmp_path, inputs, capsys):
    out = tmp_path / "eval"
    args = command_line(COMMANDS["eval mmeb"][0], inputs, out)
    assert run_in_process(capsys, *args)[0] == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["command"] == "eval mmeb" and set(marker["files"]) == set(COMMANDS["eval mmeb"][1])
    (out / "notes.txt").write_text("mine\n")
    assert run_in_process(capsys, *args)[0] == 0
    assert run_in_process(capsys, *args, "--overwrite")[0] == 0
    assert (out / "notes.txt").read_text() == "mine\n"
    (out / "summary.md").write_text("my edits\n")  # recorded, but changed since: the user's now
    for flags in ([], ["--overwrite"]):
        assert_clear_in_process(run_in_process(capsys, *args, *flags), "summary.md", "changed after")
    assert (out / "summary.md").read_text() == "my edits\n"
    other = command_line(COMMANDS["eval retrieval"][0], inputs, out)  # another command's folder
    assert_clear_in_process(run_in_process(capsys, *other), "`rematch eval mmeb`")


def test_overwrite_and_resume_in_a_run_keep_the_users_files(tmp_path, inputs, capsys):
    out = tmp_path / "run"
    args = command_line(COMMANDS["train"][0], inputs, out)
    assert run_in_process(capsys, *args)[0] == 0
    (out / "notes.txt").write_text("mine\n")
    (out / "model" / "my-eval.json").write_text("{}")  # inside an output rematch recorded: the user's too
    assert_clear_in_process(run_in_process(capsys, *args), "--resume")
    for flag in ("--overwrite", "--resume"):
        assert_clear_in_process(run_in_process(capsys, *args, flag), "model", "changed after")
    (out / "model" / "my-eval.json").unlink()
    shutil.rmtree(out / "checkpoints")  # removing what rematch wrote is fine
    assert run_in_process(capsys, *args, "--overwrite")[0] == 0
    assert (out / "notes.txt").read_text() == "mine\n"
    resumed = [token if token != "1" else "2" for token in args]  # --steps 2
    assert run_in_process(capsys, *resumed, "--resume")[0] == 0
    assert json.loads((out / "train_summary.json").read_text())["resumed_from"] == 1
    assert (out / "notes.txt").read_text() == "mine\n"
    (out / "config.yaml").write_text("my own settings\n")  # changed after the run wrote it
    assert_clear_in_process(run_in_process(capsys, *args, "--overwrite"), "config.yaml", "changed after")


def test_outputs_written_before_markers_are_recognised(tmp_path, inputs, capsys):
    """An evaluation folder and a run directory of an earlier rematch (no marker) are still
    the command's own: rerun, overwritten or resumed, with the user's files beside them kept."""
    evaluation = tmp_path / "eval"
    args = command_line(COMMANDS["eval mmeb"][0], inputs, evaluation)
    assert run_in_process(capsys, *args)[0] == 0
    (evaluation / MARKER).unlink()
    (evaluation / "notes.txt").write_text("mine\n")
    assert run_in_process(capsys, *args, "--overwrite")[0] == 0
    assert (evaluation / "notes.txt").read_text() == "mine\n"

    run = tmp_path / "run"
    train = command_line(COMMANDS["train"][0], inputs, run)
    assert run_in_process(capsys, *train)[0] == 0
    (run / MARKER).unlink()
    (run / "notes.txt").write_text("mine\n")
    resumed = [token if token != "1" else "2" for token in train]
    assert run_in_process(capsys, *resumed, "--resume")[0] == 0
    assert (run / "notes.txt").read_text() == "mine\n"


def test_replacing_a_trained_model_folder_that_holds_the_users_notes_is_refused(tmp_path, inputs, capsys):
    folder = tmp_path / "t"
    shutil.copytree(inputs["M"], folder)
    (folder / "notes.md").write_text("what I found\n")
    (folder / "eval").mkdir()
    (folder / "eval" / "summary.json").write_text("{}\n")
    before = tree_digest(folder)
    for flags in ([], ["--overwrite"]):
        outcome = run_in_process(capsys, "tiny", "--out", folder, "--num-tokens", "2", *flags)
        assert_clear_in_process(outcome, "eval, notes.md", "--overwrite")
        assert tree_digest(folder) == before
    (folder / "notes.md").unlink()
    shutil.rmtree(folder / "eval")
    assert run_in_process(capsys, "tiny", "--out", folder, "--num-tokens", "3")[0] == 0  # ours: replaced


def test_mine_never_writes_into_the_data_root(tmp_path, inputs, capsys):
    data = tmp_path / "data"
    shutil.copytree(inputs["W"], data)
    before = tree_digest(data)
    for out in (data, data / "mined"):
        assert_clear_in_process(run_in_process(capsys, "mine", "--random", "--data", data, "--out", out), "--data")
    assert tree_digest(data) == before


def test_a_world_folder_holding_the_users_own_subset_is_refused(tmp_path, capsys):
    world = tmp_path / "w"
    synth = ["data", "synth", "--out", world, *SYNTH]
    assert run_in_process(capsys, *synth)[0] == 0
    (world / "MySubset").mkdir()
    (world / "MySubset" / "train.jsonl").write_text('{"qry": "mine"}\n')
    before = tree_digest(world)
    for flags in ([], ["--overwrite"]):
        assert_clear_in_process(run_in_process(capsys, *synth, *flags), "MySubset")
        assert tree_digest(world) == before


def test_synth_killed_mid_write_then_rerun_writes_the_same_world_as_a_clean_run(tmp_path, capsys):
    clean = tmp_path / "clean"
    sizes = ["--train-rows", "3000", "--eval-queries", "20", "--candidates", "20", "--image-size", "56"]
    assert run_in_process(capsys, "data", "synth", "--out", clean, *sizes)[0] == 0
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "rematch.cli", "data", "synth", "--out", str(killed), *sizes],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".killed.tmp-*/images")) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(tmp_path.glob(".killed.tmp-*")) and not killed.exists()  # killed mid-write
    assert run_in_process(capsys, "data", "synth", "--out", killed, *sizes)[0] == 0
    assert (killed / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()
    assert tree_digest(killed) == tree_digest(clean)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "killed"]  # the dead write's remains are gone


def test_an_output_path_too_long_for_the_file_system_is_one_line(tmp_path, inputs, capsys):
    long = tmp_path / ("a" * 5000)
    for args in (["tiny", "--out", long], ["data", "synth", "--out", long, *SYNTH],
                 ["encode", "--model", inputs["M"], "--allow-untrained", "--input", inputs["E"], "--out",
                  f"{long}.npy"],
                 ["train", "--data", inputs["W"], "--out", long, *TRAIN]):
        status, lines = run_in_process(capsys, *args)
        assert_clear_in_process((status, lines), "the path is too long")
        assert len(lines[-1]) < 400


def test_a_damaged_or_foreign_marker_is_refused(tmp_path):
    from rematch.outputs import OutputDirectory, OutputRefusedError, claim_outputs

    claim_outputs(tmp_path / "a", "eval mmeb", ["summary.json"]).seal()
    with pytest.raises(OutputRefusedError, match="`rematch eval mmeb`, not of `rematch mine`"):
        OutputDirectory.inspect(tmp_path / "a", "mine")
    (tmp_path / "a" / MARKER).write_text("{")
    with pytest.raises(OutputRefusedError, match="damaged"):
        OutputDirectory.inspect(tmp_path / "a", "eval mmeb")
    with pytest.raises(ValueError, match="not an output entry name"):
        claim_outputs(tmp_path / "b", "eval mmeb", ["../escape"])
