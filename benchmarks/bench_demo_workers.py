"""`rematch demo` wall time with its rows one after another vs side by side in worker processes.

Why: one tiny model keeps one core busy and gains nothing from a second thread
(bench_threads.py), so on a 2-core laptop the demo used half the machine. With
``--workers N`` the ablation rows train in N processes of one thread each. This runs the same
demo command with ``--workers 1`` and with ``--workers N`` (default: one per core), each in a
fresh process and output folder, prints both wall times and their ratio, and checks that every
row measured the same numbers both ways (the speed-up must not change a result).

    python benchmarks/bench_demo_workers.py [--workers 2] [-- extra demo arguments, e.g. --quick]

The default demo takes about 20 minutes for both runs on a 2-core VM; ``-- --steps 60`` or
``-- --quick`` make it shorter (the ratio then includes more of the fixed start-up cost).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def run_demo(workers: int, out: Path, extra: list[str]) -> tuple[float, dict]:
    command = [sys.executable, "-m", "rematch.cli", "demo", "--out", str(out), "--workers", str(workers), *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    return seconds, json.loads((out / "demo_results.json").read_text(encoding="utf-8"))


def measured(results: dict) -> dict:
    """Per (row, seed): what the row measured (no clock readings)."""
    return {(r["row"], r["seed"]): (r["final_losses"], r["hit@1"], r["overall"], r["reranked_overall"])
            for r in results["records"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parser.add_argument("--workers", type=int, default=max(2, default_workers))
    parser.add_argument("extra", nargs="*", help="more `rematch demo` arguments (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        serial, serial_results = run_demo(1, Path(work) / "serial", args.extra)
        parallel, parallel_results = run_demo(args.workers, Path(work) / "parallel", args.extra)
    same = measured(serial_results) == measured(parallel_results)
    print(f"{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads per row 1, demo arguments: {' '.join(args.extra) or '(default)'}")
    print(f"| workers | wall time | ratio |\n|---|---|---|\n| 1 | {serial / 60:.1f} min | 1.00 |\n"
          f"| {args.workers} | {parallel / 60:.1f} min | {serial / parallel:.2f}x faster |")
    print(f"every row's losses and scores identical both ways: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
