"""What a new user sees: every flag explained with its default, a short ``info``, no loading bars, and a
run directory given as a model pointed at its ``model/``.

Before issue 25 ``--role``, ``--batch-size``, ``--text``, ``-k`` and ``--progress`` had no
help, ``rematch info DIR`` printed 80 lines of JSON, every command printed transformers'
"Loading weights 81/81" bar, and ``--model RUN_DIR`` failed without naming ``RUN_DIR/model``.
"""

from __future__ import annotations

import argparse
import json

import pytest

from rematch import ReMatchModel
from rematch.cli import build_parser, main

#: The commands whose flags this issue covers (serve.py, index.py, export.py, encode and info).
COMMANDS = ("serve", "index build", "index add", "index delete", "search", "export", "push", "encode", "info")


def parsers() -> dict[str, argparse.ArgumentParser]:
    found = {}

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found[" ".join(prefix + (name,))] = sub
                    walk(sub, prefix + (name,))

    walk(build_parser(), ())
    return found


def flag_problems(parser: argparse.ArgumentParser) -> list[str]:
    """Flags without help, and flags with a default their help does not show."""
    problems = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        name = action.option_strings[-1]
        if not action.help:
            problems.append(f"{name}: no help")
            continue
        flag_like = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if not flag_like and not action.required and "default" not in action.help:
            problems.append(f"{name}: help does not give the default ({action.default!r})")
    return problems


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_and_shows_its_default(command):
    parser = parsers()[command]
    assert flag_problems(parser) == [], command
    text = parser.format_help()
    if command == "encode":
        assert "(default query)" in text and "(default 16)" in text
    if command == "search":
        assert "(default 10)" in text and "query text" in text
    if command == "index build":
        assert "--no-progress" in text


def test_info_prints_a_short_summary_and_json_on_request(tmp_path, capsys):
    model = ReMatchModel.tiny(pretrained=True, num_tokens=2)
    with __import__("torch").no_grad():
        model.query_tokens.add_(0.01)  # as after training
    model.save_pretrained(tmp_path / "model")
    assert main(["info", str(tmp_path / "model")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) <= 12 and "--json" in lines[-1]
    text = "\n".join(lines)
    assert "fine-tuned from tiny-pretrained" in text and "heads      trained" in text and "K=2" in text
    assert main(["info", str(tmp_path / "model"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_tokens"] == 2


def test_a_run_directory_as_model_points_at_its_model(tmp_path, cli_error):
    run = tmp_path / "run"
    ReMatchModel.tiny(num_tokens=2).save_pretrained(run / "model")
    (run / "run.json").write_text("{}")
    (tmp_path / "items.jsonl").write_text('{"text": "a red circle"}\n')
    for argv in (["encode", "--model", run, "--input", tmp_path / "items.jsonl", "--out", tmp_path / "v.npy",
                  "--allow-untrained"], ["info", run]):
        line = cli_error(argv)
        assert f"its model is in {run / 'model'}" in line and f"--model {run / 'model'}" in line


def test_loading_a_model_prints_no_weight_loading_bar(tmp_path, capfd):
    from transformers.utils import logging as transformers_logging

    ReMatchModel.tiny(num_tokens=2).save_pretrained(tmp_path / "model")
    capfd.readouterr()
    ReMatchModel.from_pretrained(tmp_path / "model", device="cpu")
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()  # put back as it was


def test_index_build_shows_its_progress_bar_unless_told_not_to():
    parser = build_parser()
    base = ["index", "build", "--model", "m", "--corpus", "c", "--out", "o"]
    assert parser.parse_args(base).progress is True  # as `rematch encode` shows its bar
    assert parser.parse_args([*base, "--no-progress"]).progress is False
    assert parser.parse_args([*base, "--progress"]).progress is True  # the old spelling still parses
