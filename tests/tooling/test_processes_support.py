"""The tests' subprocess deadline fails a hung run and takes its children with it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import run_with_deadline

# a parent that starts a child and both sleep, like torchrun and its ranks stuck in a collective
HUNG = ("import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(120)")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads process states from /proc")
def test_a_hung_run_fails_at_its_deadline_and_leaves_no_process_behind(tmp_path):
    marker = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(AssertionError, match="no result after 3 s"):
        run_with_deadline([sys.executable, "-c", HUNG, str(marker)], timeout=3, text=True)
    assert time.monotonic() - started < 30
    child = int(marker.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the hung run's own child survived the deadline"


def test_a_finished_run_returns_its_output():
    done = run_with_deadline([sys.executable, "-c", "print('ok')"], text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok"
