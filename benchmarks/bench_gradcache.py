"""Peak memory and step time of one training step: plain large batch vs GradCache chunks.

Same model, same batch, same losses (contrastive + orthogonality + matching on a
sub-batch); every variant runs in its own subprocess so its peak memory is its own
(CUDA: max allocated; CPU: peak resident set size, which includes the ~0.5 GB of
Python, torch and the model that every variant pays).

    python benchmarks/bench_gradcache.py                      # tiny model, CPU, batch 64
    python benchmarks/bench_gradcache.py --backbone-size 3b --device cuda --dtype bfloat16 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from rematch.config import LossConfig
    from rematch.training.collate import TrainCollator
    from rematch.data.mmeb import open_train_source
    from rematch.world.tasks import write_shapes_dataset
    from rematch.model import ReMatchModel
    from rematch.training.gradcache import GradCache
    from rematch.training.step import ReMatchTrainingModule

    family = "qwen2_5_vl" if args.backbone_size in ("3b", "7b") else "qwen2_vl"
    model = ReMatchModel.tiny(size=args.backbone_size, backbone=family, num_tokens=16, dtype=args.dtype,
                              max_pixels=max(448 * 448, args.image_size ** 2), device=args.device)
    module = ReMatchTrainingModule(model, LossConfig(matching=0.1, matching_samples=args.matching_samples))
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as folder:
        root = write_shapes_dataset(Path(folder), train_rows=args.batch_size * 2, eval_queries=0, seed=0,
                                    image_size=args.image_size)
        batch = TrainCollator(model)(open_train_source(str(root), seed=0).take(args.batch_size))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            if args.chunk:
                GradCache(module, args.chunk).step(batch)
            else:
                module(batch)["loss"].backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            module.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"chunk": args.chunk, "step_s": min(times), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone-size", default="tiny", choices=["tiny", "small", "base", "2b", "3b", "7b"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--matching-samples", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk is not None:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for chunk in [0, *args.chunks]:
        command = [sys.executable, __file__, *sys.argv[1:], "--chunk", str(chunk)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    print(f"date {date.today()}  device {args.device} ({platform.machine()})  backbone {args.backbone_size}  "
          f"dtype {args.dtype}  batch {args.batch_size}  image {args.image_size}px  "
          f"matching samples {args.matching_samples}")
    base = rows[0]
    print(f"{'variant':<26}{'step (s)':>10}{'peak memory':>14}{'memory vs plain':>17}")
    for row in rows:
        label = "plain (one forward)" if not row["chunk"] else f"GradCache, chunk {row['chunk']}"
        print(f"{label:<26}{row['step_s']:>10.2f}{row['peak_bytes'] / 2**20:>11.0f} MiB"
              f"{row['peak_bytes'] / base['peak_bytes']:>16.2f}x")


if __name__ == "__main__":
    main()
