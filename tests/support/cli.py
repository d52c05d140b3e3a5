"""Running ``rematch`` in the test process and checking what a user would see and keep.

In-process runs skip interpreter start-up (seconds each); an exception escaping ``main`` is
exactly what a user would have seen as a traceback, and fails the test.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


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
    """Exit status 1 and one line ``rematch: error: ...`` holding every fragment."""
    status, lines = outcome
    assert status == 1 and lines and lines[-1].startswith("rematch: error: "), outcome
    assert sum(line.startswith("rematch") for line in lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (hidden ones too) with a hash of its bytes; a folder as such."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}
