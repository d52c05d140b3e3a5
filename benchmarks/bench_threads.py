"""Demo training speed by torch thread count, on a quiet machine and beside one busy process.

Why: the demo's tiny model has matrices too small for intra-op parallelism to pay, while
OpenMP threads that wait on each other stall badly when another process holds a core. This
runs the demo's full row (pretrained start, the demo's image size) for a few steps with
1 and with 2 torch threads, first alone, then next to a process that keeps one core busy,
each run in a fresh subprocess, and prints the times and ratios side by side.

    python benchmarks/bench_threads.py [--steps 8] [--backbone tiny-pretrained|tiny]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date

CHILD = r"""
import sys, time, torch
from pathlib import Path
from rematch.config import apply_overrides
from rematch.world.tasks import write_shapes_dataset
from rematch.demo.pipeline import row_config
from rematch.demo.settings import ROWS, DemoSettings
threads, steps, backbone, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
torch.set_num_threads(threads)
settings = DemoSettings.create(out=work, backbone=backbone)
data = work / "shapes"
if not data.exists():
    write_shapes_dataset(data, train_rows=200, eval_queries=0, seed=0)
config = row_config(settings, ROWS[-1], 0, data, work / f"run-{threads}")
config = apply_overrides(config, {"train.steps": steps, "train.plot": False})
from rematch.training.loop import train
start = time.perf_counter()
train(config, show_progress=False, log=lambda *_: None)
print(time.perf_counter() - start)
"""


def busy_core(stop) -> None:
    """Keep one core busy (a second job on the machine) until told to stop."""
    value = 0
    while not stop.is_set():
        for step in range(100_000):
            value = (value * 31 + step) % 1_000_003


def timed_run(threads: int, steps: int, backbone: str, work: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps), backbone, work], env=env,
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--backbone", default="tiny-pretrained")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        timed_run(1, 1, args.backbone, work)  # writes the data once, outside the timings
        for label in ("alone", "beside one busy process"):
            stop = multiprocessing.Event()
            competitor = multiprocessing.Process(target=busy_core, args=(stop,)) if label != "alone" else None
            if competitor:
                competitor.start()
            try:
                one, two = (timed_run(threads, args.steps, args.backbone, work) for threads in (1, 2))
            finally:
                if competitor:
                    stop.set()
                    competitor.join()
            rows.append((label, one, two))
    print(f"# demo full row, {args.steps} steps, backbone {args.backbone}; {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, {date.today()}")
    print(f"{'machine':<26}{'1 thread s':>12}{'2 threads s':>13}{'2 / 1':>8}")
    for label, one, two in rows:
        print(f"{label:<26}{one:>12.1f}{two:>13.1f}{two / one:>8.2f}")


if __name__ == "__main__":
    main()
