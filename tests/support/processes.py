"""Run a test's subprocess (a CLI run, a torchrun launch) with a deadline.

Why: a collective that only some ranks reach (a reduce inside ``if is_main``) hangs every
rank forever, and a test that waits without a limit hangs the whole suite instead of
failing. The child runs in a session of its own so that, at the deadline, its whole process
group goes (torchrun's ranks with it, not left behind holding a core and a port), and the
test fails naming the command and the end of its output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
from typing import Sequence

#: Long enough for the slowest of these runs on a busy 2-core machine, short enough to fail fast.
DEADLINE_S = 600

#: The first lines of a child script that must work without rematch (an export, a model card's
#: code): any import of rematch fails in it, as on a machine where it is not installed, and the
#: child stops at once if rematch can still be imported.
NO_REMATCH = textwrap.dedent('''
    import sys

    class NoRematch:
        def find_spec(self, name, path=None, target=None):
            if name == "rematch" or name.startswith("rematch."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoRematch())
    try:
        import rematch  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("rematch is importable in the child")
''')


def run_with_deadline(command: Sequence[str], timeout: float = DEADLINE_S, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, **kwargs)``, failing the test after ``timeout`` s."""
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        tail = stderr[-2000:] if isinstance(stderr, str) else stderr[-2000:].decode(errors="replace")
        raise AssertionError(f"no result after {timeout:.0f} s (a hang?): {' '.join(map(str, command))}\n{tail}") \
            from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
