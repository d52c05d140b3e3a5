"""Start-up time of `rematch --help` and `rematch info DIR` next to `python -c "import torch"`.

Why: a command that only prints its flags or a saved model's JSON used to import torch and
transformers first (``import rematch`` loaded the model), so it took as long as starting a
training run. Issue 23 asks for both to take at most a third of a bare ``import torch``.
This runs each command as a whole subprocess (interpreter start included, as a user sees
it), interleaved round by round so a slower moment of the machine hits all three alike,
and prints min / median / max per command and each rematch median over the torch median.

    python benchmarks/bench_startup.py [--runs 5]

The model for ``info`` is made once by ``rematch tiny --out`` in a temporary directory,
outside the timings; every command runs once untimed first, so all read from a warm disk cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

#: A rematch median at most this share of the torch-import median passes (issue 23).
TARGET = 1 / 3


def rematch_entry_point() -> Path:
    """The venv's own ``rematch`` script, next to this interpreter (what a user's shell runs)."""
    script = Path(sys.executable).parent / ("rematch.exe" if os.name == "nt" else "rematch")
    if not script.exists():
        raise SystemExit(f"no rematch entry point next to {sys.executable}: pip install -e . in this environment")
    return script


def commands(rematch: Path, model_dir: Path) -> dict[str, list[str]]:
    """What is timed, by the label it is printed under."""
    return {"rematch --help": [str(rematch), "--help"],
            "rematch info DIR": [str(rematch), "info", str(model_dir)],
            'python -c "import torch"': [sys.executable, "-c", "import torch"]}


def timed(argv: list[str]) -> float:
    """Wall seconds of one whole subprocess; a failing command stops the benchmark."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def measure(runs: dict[str, list[str]], rounds: int) -> dict[str, list[float]]:
    """``rounds`` timings per command, one of each per round, after one untimed warm-up each."""
    for argv in runs.values():
        timed(argv)
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, argv in runs.items():
            times[label].append(timed(argv))
    return times


def report(times: dict[str, list[float]], baseline: str) -> bool:
    """Print the table; True when every rematch median is within TARGET of the baseline's."""
    base = statistics.median(times[baseline])
    print(f"{'command':<28}{'min s':>8}{'median s':>10}{'max s':>8}{'/ torch':>9}")
    passed = True
    for label, values in times.items():
        median = statistics.median(values)
        verdict = ""
        if label != baseline:
            ok = median <= TARGET * base
            passed &= ok
            verdict = f"  {'PASS' if ok else 'FAIL'} (target <= {TARGET:.2f})"
        print(f"{label:<28}{min(values):>8.3f}{median:>10.3f}{max(values):>8.3f}{median / base:>9.3f}{verdict}")
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command (default 5)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    rematch = rematch_entry_point()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as work:
        model_dir = Path(work) / "model"
        subprocess.run([str(rematch), "tiny", "--out", str(model_dir)], check=True, capture_output=True)
        runs = commands(rematch, model_dir)
        times = measure(runs, args.runs)
    print(f"# start-up, {args.runs} runs each; {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, {date.today()}")
    passed = report(times, baseline='python -c "import torch"')
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
