"""The package keeps the layers the README's Architecture section writes down (scripts/check_layers.py)."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
from tests.support import REPO



@pytest.fixture(scope="module")
def check_layers():
    spec = importlib.util.spec_from_file_location("check_layers_under_test", REPO / "scripts" / "check_layers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_every_import_points_down_and_no_cycle(check_layers):
    assert check_layers.check() == []


def _package(tmp_path: Path, files: dict[str, str], table: str) -> tuple[Path, Path]:
    src = tmp_path / "src"
    for name, text in files.items():
        path = src / "rematch" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n### Layers\n\n| layer | package | what |\n|---|---|---|\n" + table + "\n## Next\n")
    return src, readme


TABLE = "| 1 | `top.py` | top |\n| 2 | `mid/` | middle |\n| 3 | `floor.py` | floor |\n"


def test_an_import_up_inside_a_function_is_found(check_layers, tmp_path):
    src, readme = _package(tmp_path, {
        "__init__.py": "", "top.py": "import rematch.mid.a\n", "mid/__init__.py": "",
        "mid/a.py": "def f():\n    from rematch.top import x\n", "floor.py": "",
    }, TABLE.replace("| 1 | `top.py`", "| 1 | `rematch/__init__.py`, `top.py`"))
    problems = check_layers.check(src, readme)
    assert len(problems) == 2  # the arrow up, and the cycle it closes
    assert "arrow up" in problems[0] and "rematch.mid.a -> rematch.top (inside a function)" in problems[0]
    assert problems[1] == "cycle: rematch.mid.a -> rematch.top"


def test_a_cycle_inside_one_layer_and_an_uncovered_module_are_found(check_layers, tmp_path):
    src, readme = _package(tmp_path, {
        "__init__.py": "", "top.py": "", "mid/__init__.py": "",
        "mid/a.py": "from rematch.mid import b\n", "mid/b.py": "from .a import thing\n", "floor.py": "",
        "stray.py": "",
    }, TABLE.replace("| 1 | `top.py`", "| 1 | `rematch/__init__.py`, `top.py`"))
    problems = check_layers.check(src, readme)
    assert "rematch.stray: no row of the README's layer table covers it" in problems
    assert "cycle: rematch.mid.a -> rematch.mid.b" in problems


def test_an_exception_needs_its_reason(check_layers, tmp_path):
    files = {"__init__.py": "", "top.py": "", "mid/__init__.py": "", "floor.py": "import rematch.top\n"}
    table = TABLE.replace("| 1 | `top.py`", "| 1 | `rematch/__init__.py`, `top.py`")
    src, readme = _package(tmp_path, files, table)
    readme.write_text(readme.read_text() + "### Layer exceptions\n\n| importer | imported | reason |\n|---|---|---|\n"
                      "| `floor.py` | `top.py` | the test says so |\n")
    assert check_layers.check(src, readme) == []
    readme.write_text(readme.read_text().replace("the test says so", ""))
    with pytest.raises(ValueError, match="no reason"):
        check_layers.check(src, readme)


def test_the_command_line_reports_no_problem_on_this_repository(check_layers, capsys):
    assert check_layers.main([]) == 0
    assert capsys.readouterr().out.strip().endswith("0 problem(s)")
