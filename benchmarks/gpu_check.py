"""Issue 14's GPU measurement as one prepared command (about 6-8 minutes on one H100/H200).

Runs, on random weights with the published Qwen2.5-VL-3B shapes (bf16, 448 px images):

* bench_encode: plain transformers forward vs ReMatchModel.encode (old path: preprocessing
  in line; new path: prefetched), and the padding-free forward when flash-attn is installed;
* bench_train: one LoRA training step (gradient checkpointing, matching on), the old path
  (every pass runs the vision tower, matching decodes its images again) vs the new one;

and prints one table of items/s and peak memory, with the card and the date. Every part
has its own time limit, so a slow part is reported as such instead of eating the rest.

    python benchmarks/gpu_check.py                 # on the GPU machine
    python benchmarks/gpu_check.py --size tiny     # a dry run of the same script on a CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(name: str, command: list[str], limit_s: int) -> tuple[dict | None, str]:
    """Run one benchmark with a JSON output file; (its numbers or None, a status line)."""
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "result.json"
        started = time.perf_counter()
        try:
            done = subprocess.run([*command, "--json", str(output)], capture_output=True, text=True,
                                  timeout=limit_s)
        except subprocess.TimeoutExpired:
            return None, f"{name}: over its {limit_s} s limit"
        seconds = time.perf_counter() - started
        print(done.stdout, end="", flush=True)
        if done.returncode != 0:
            return None, f"{name}: failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
        return json.loads(output.read_text()), f"{name}: {seconds:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="3b", help="backbone size (3b on the GPU; tiny for a CPU dry run)")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--encode-items", type=int, default=96)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--limit-s", type=int, default=240, help="time limit of each part")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    card = torch.cuda.get_device_name() if cuda else "cpu"
    flash = importlib.util.find_spec("flash_attn") is not None
    python = sys.executable
    encode = [python, str(HERE / "bench_encode.py"), "--backbone-size", args.size, "--device", device, "--dtype",
              dtype, "--image-size", str(args.image_size), "--items", str(args.encode_items), "--batch-size", "16",
              "--repeats", "2"] + ([] if flash else ["--no-padding-free"])
    train = [python, str(HERE / "bench_train.py"), "--backbone-size", args.size, "--device", device, "--dtype",
             dtype, "--image-size", str(args.image_size), "--batch-size", str(args.train_batch), "--lora",
             "--gradient-checkpointing", "--steps", "3", "--warmup", "1", "--matching-samples", "4",
             "--variants", "packed-old", "packed"]
    print(f"gpu_check {date.today()}  {card}  torch {torch.__version__}  flash-attn "
          f"{'installed' if flash else 'not installed (sdpa; the vision tower loops per image)'}", flush=True)
    statuses = []
    encoded, status = run("bench_encode", encode, args.limit_s)
    statuses.append(status)
    trained, status = run("bench_train", train, args.limit_s)
    statuses.append(status)

    print(f"\n== issue 14 on {card}, {date.today()}, {args.size} random weights, {dtype}, {args.image_size} px ==")
    print(f"{'what':<44}{'items/s':>10}{'peak GiB':>10}")

    def row(label: str, items_s: float, peak: int | None) -> None:
        print(f"{label:<44}{items_s:>10.1f}{(peak or 0) / 2**30 if peak else float('nan'):>10.2f}")

    if encoded:
        for label, numbers in encoded["rows"].items():
            row(f"encode: {label}", numbers["items_s"], numbers["peak_bytes"])
        rows = encoded["rows"]
        plain, new, old = (rows[k]["items_s"] for k in ("plain", "encode, prefetch (new)", "encode, in line (old)"))
        print(f"encode ours / plain transformers: {new / plain:.2f}x (target >= 3x); prefetch / in line: "
              f"{new / old:.2f}x")
    if trained:
        for label, numbers in trained["results"].items():
            row(f"train step: {label}", numbers["items_s"], numbers["peak_bytes"])
        results = trained["results"]
        old = results.get("+ matching, packed, old path")
        new = results.get("+ matching, packed (ours)")
        if old and new:
            print(f"train step new / old path: {old['step_s'] / new['step_s']:.2f}x faster (target >= 2x)")
    for status in statuses:
        print(status)
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(json.dumps({"card": card, "date": str(date.today()),
                                                           "encode": encoded, "train": trained}, indent=1))


if __name__ == "__main__":
    main()
