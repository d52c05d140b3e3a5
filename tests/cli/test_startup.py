"""``rematch --help``, ``rematch <command> --help`` and ``rematch info DIR`` import neither torch nor transformers.

Importing torch and transformers takes seconds; a command that only prints its flags or a
JSON file should not wait for them (issue 23; benchmarks/bench_startup.py times it). The
checks run in a fresh interpreter, since this test process has imported torch already.
Where a parser shows a library constant that cannot be imported without torch, the CLI
keeps a literal copy and a test here holds the two equal.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rematch.cli import build_parser, main

HEAVY_MODULES = ("torch", "transformers", "accelerate", "peft", "faiss", "datasets")

#: Runs each command in one fresh interpreter and prints, as JSON, which heavy modules
#: were imported after each one (and what ``info`` printed), so a failure names the command.
PROBE = """
import argparse, contextlib, io, json, sys
from rematch.cli import build_parser, main

def command_paths(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from command_paths(sub, prefix + (name,))

heavy, model_dir = json.loads(sys.argv[1]), sys.argv[2]
report = {"loaded": {}, "commands": []}
runs = [[*path, "--help"] for path in [(), *command_paths(build_parser())]] + [["info", model_dir],
                                                                               ["info", model_dir, "--json"]]
for argv in runs:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            status = main(argv)
        except SystemExit as stop:  # --help exits 0 once it has printed
            status = stop.code
    report["commands"].append(argv)
    report["loaded"][" ".join(argv)] = {"status": status, "heavy": [m for m in heavy if m in sys.modules],
                                        "out": out.getvalue()}
print(json.dumps(report))
"""


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _command_paths(sub, prefix + (name,))


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its words, e.g. ``"eval mmeb"``."""
    return {" ".join(path): sub for path, sub in _command_paths(build_parser())}


def _choices(command: str, flag: str) -> tuple:
    for action in _parsers()[command]._actions:
        if flag in action.option_strings:
            return tuple(action.choices)
    raise AssertionError(f"rematch {command} has no {flag}")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A model saved by ``rematch tiny`` (in this process: 0.5 s, no global state changed)."""
    out = tmp_path_factory.mktemp("startup") / "model"
    assert main(["tiny", "--out", str(out), "--num-tokens", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def probe(saved_model) -> dict:
    """The PROBE's report for the help of every command and for ``info`` of the saved model."""
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HEAVY_MODULES), str(saved_model)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_every_command_is_probed(probe):
    probed = {" ".join(argv[:-1]) for argv in probe["commands"] if argv[-1] == "--help"}
    assert probed == {""} | set(_parsers())
    assert {"demo", "tiny", "info", "train", "eval mmeb", "index build", "serve", "export"} <= probed


def test_help_imports_neither_torch_nor_transformers(probe):
    for command, seen in probe["loaded"].items():
        if command.endswith("--help"):
            assert seen["status"] == 0 and seen["out"].startswith("usage: rematch"), command
            assert seen["heavy"] == [], f"rematch {command} imported {seen['heavy']}"


def test_info_reads_json_only(probe, saved_model):
    summary = probe["loaded"][f"info {saved_model}"]
    assert summary["status"] == 0 and summary["heavy"] == [], summary["heavy"]
    seen = probe["loaded"][f"info {saved_model} --json"]
    assert seen["status"] == 0 and seen["heavy"] == [], seen["heavy"]
    assert json.loads(seen["out"]) == json.loads((saved_model / "rematch_config.json").read_text())
    assert json.loads(seen["out"])["model"]["num_tokens"] == 4


def test_info_of_a_directory_that_is_no_saved_model_says_so(tmp_path, cli_error):
    (tmp_path / "empty").mkdir()
    assert "is not a saved ReMatch model" in cli_error(["info", tmp_path / "empty"])
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "rematch_config.json").write_text("{")
    assert "not valid JSON" in cli_error(["info", tmp_path / "damaged"])  # the library's reader, its message
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "rematch_config.json").write_text("[]")
    assert "expected a JSON object" in cli_error(["info", tmp_path / "listed"])


def test_the_public_names_still_import():
    import rematch
    from rematch import Config, EmbeddingOutput, Item, ItemError, ModelConfig, ReMatchModel, load_config
    from rematch.config import Config as config_class
    from rematch.model import ReMatchModel as model_class

    assert ReMatchModel is model_class and Config is config_class
    assert all(name in dir(rematch) for name in rematch.__all__)
    assert [getattr(rematch, name) for name in rematch.__all__]  # every exported name resolves
    assert {value.__module__ for value in (EmbeddingOutput, Item, ItemError, ModelConfig, load_config)} == {
        "rematch.model", "rematch.data.items", "rematch.config"}
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        rematch.NoSuchName  # noqa: B018


# ---------------------------------------------------------------------------- literal copies of heavy constants


def test_choices_written_out_in_parsers_are_the_library_constants():
    """Parsers whose choices live in modules that import torch (directly or through their
    package's ``__init__``) spell them out; these must not drift from the library's."""
    from rematch.backbones.tiny import FAMILIES, QWEN3_VL_SMALL_SIZES
    from rematch.config import ROLES
    from rematch.demo.settings import BACKBONES
    from rematch.evaluation.mmeb_v2.tasks import MODALITIES
    from rematch.evaluation.settings import PRESETS
    from rematch.export.exporter import EXPORT_FORMATS
    from rematch.retrieval.index import INDEX_TYPES
    from rematch.world.pretrain_corpus import ASKED_POSITIONS

    assert _choices("tiny", "--size") == tuple(QWEN3_VL_SMALL_SIZES)
    assert _choices("tiny", "--backbone") == tuple(FAMILIES)
    assert _choices("encode", "--role") == tuple(ROLES)
    assert _choices("demo", "--backbone") == tuple(BACKBONES)
    for command in ("eval mmeb", "eval mmeb-v2"):
        assert _choices(command, "--input-limits") == tuple(PRESETS)
    assert _choices("eval mmeb-v2", "--modalities") == tuple(MODALITIES)
    assert _choices("eval generative", "--image-position") == tuple(ASKED_POSITIONS)
    assert _choices("index build", "--index-type") == tuple(INDEX_TYPES)
    assert _choices("export", "--format") == tuple(EXPORT_FORMATS)


def test_errors_of_modules_imported_later_are_still_user_errors():
    """commands.errors counts torch's and the checkpoint reader's errors once they are imported."""
    import torch

    from rematch.commands.errors import is_user_error
    from rematch.training.checkpoint import UnsafeCheckpointError

    assert is_user_error(UnsafeCheckpointError("a pickle that runs code"))
    assert is_user_error(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_user_error(RuntimeError("a bug"))
