"""Training-step cost of the matching branch (contrastive-only vs + packed vs + reference matching), and
the step's old path vs new path (issue 14: frozen-tower image features once per step, matching views from the
already-processed images prepared in the collator).

All variants train the same model on the same batch (built-in shapes world, one hard
negative per sample) for the same number of steps; each runs in its own subprocess so
peak memory is measured per variant (CUDA: max allocated; CPU: peak resident set size).

    python benchmarks/bench_train.py                          # tiny model, CPU
    python benchmarks/bench_train.py --backbone-size 3b --device cuda --dtype bfloat16 \\
        --lora --gradient-checkpointing --image-size 448 --batch-size 8 --steps 4

Targets: packed matching adds <= 40% to the contrastive-only step and is >= 2x faster
than the reference (each of the 8 pairs as its own sequence). "packed, old path" is the
same step as "packed" with every pass running the vision tower and the matching branch
decoding its images again (what main did before issue 14); with --lora the tower is
frozen, which is where the new path saves tower passes. --variants picks a subset.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

VARIANTS = ("contrastive", "packed", "reference", "packed-old")
LABELS = {"contrastive": "contrastive + orthogonality", "packed": "+ matching, packed (ours)",
          "reference": "+ matching, reference (8 seqs)", "packed-old": "+ matching, packed, old path"}


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from rematch.config import LossConfig
    from rematch.training.collate import TrainCollator
    from rematch.data.mmeb import open_train_source
    from rematch.world.tasks import write_shapes_dataset
    from rematch.model import ReMatchModel
    from rematch.training.gradcache import GradCache
    from rematch.training.step import ReMatchTrainingModule

    torch.manual_seed(0)
    family = args.family or ("qwen2_5_vl" if args.backbone_size in ("3b", "7b") else "qwen2_vl")
    model = ReMatchModel.tiny(size=args.backbone_size, backbone=family, num_tokens=args.k, dtype=args.dtype,
                              max_pixels=max(448 * 448, args.image_size ** 2), device=args.device)
    if args.lora:
        model.enable_lora(r=32, alpha=64, dropout=0.0)
    if args.gradient_checkpointing:
        model.adapter.causal_lm(model.backbone).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    matching = 0.0 if args.variant == "contrastive" else 0.1
    old_path = args.variant == "packed-old"
    module = ReMatchTrainingModule(model, LossConfig(matching=matching, matching_samples=args.matching_samples),
                                   packed_matching=args.variant != "reference", reuse_image_features=not old_path,
                                   reuse_processed_images=not old_path)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    with tempfile.TemporaryDirectory() as folder:
        root = write_shapes_dataset(Path(folder), train_rows=max(64, args.batch_size * 2), eval_queries=0,
                                    seed=0, image_size=args.image_size, tasks=["ShapesT2I", "ShapesI2T"])
        source = open_train_source(str(root), seed=0)
        examples = source.take(args.batch_size)
        # the new path's collator also tokenises the matching views (in the data threads, not timed here)
        batch = TrainCollator(model, matching=bool(matching) and not old_path)(examples)
        cuda = args.device.startswith("cuda")
        times = []
        for step in range(args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize()
                if step == args.warmup:
                    torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            if args.grad_cache_chunk:
                terms = GradCache(module, args.grad_cache_chunk).step(batch, step)
            else:
                terms = module(batch, step)
                terms["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": args.variant, "step_s": statistics.median(times), "peak_bytes": peak,
            "losses": {k: float(v) for k, v in terms.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone-size", default="tiny", choices=["tiny", "small", "base", "2b", "3b", "7b"])
    parser.add_argument("--family", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--matching-samples", type=int, default=0, help="0 = match the whole batch")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--grad-cache-chunk", type=int, default=0, help="0 = one plain forward per step")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", help="also write the numbers to this file (benchmarks/gpu_check.py reads it)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    results = {}
    for variant in args.variants:
        command = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    device = args.device
    if device.startswith("cuda"):
        import torch
        device += f" ({torch.cuda.get_device_name()})"
    else:
        device += f" ({platform.processor() or platform.machine()})"
    print(f"date {date.today()}  device {device}  backbone {args.backbone_size}  dtype {args.dtype}  "
          f"batch {args.batch_size}  K {args.k}  image {args.image_size}px  lora {args.lora}  "
          f"grad-ckpt {args.gradient_checkpointing}  grad-cache {args.grad_cache_chunk or 'off'}  "
          f"matching samples {args.matching_samples or args.batch_size}")
    first = results[args.variants[0]]
    print(f"{'variant':<34}{'step (s)':>10}{'items/s':>10}{'peak memory':>14}{'vs ' + args.variants[0]:>18}")
    for name in args.variants:
        r = results[name]
        print(f"{LABELS[name]:<34}{r['step_s']:>10.3f}{args.batch_size / r['step_s']:>10.1f}"
              f"{r['peak_bytes'] / 2**20:>11.0f} MiB{r['step_s'] / first['step_s']:>17.2f}x")
    if "contrastive" in results and "packed" in results:
        base, packed = results["contrastive"], results["packed"]
        print(f"packed matching overhead: {packed['step_s'] / base['step_s'] - 1:+.0%} step time "
              f"(target <= +40%), {packed['peak_bytes'] / base['peak_bytes'] - 1:+.0%} peak memory")
    if "reference" in results and "packed" in results:
        packed, reference = results["packed"], results["reference"]
        print(f"packed vs reference: {reference['step_s'] / packed['step_s']:.2f}x faster (target >= 2x), "
              f"{reference['peak_bytes'] / packed['peak_bytes']:.2f}x the memory")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "batch": args.batch_size, "results": {
            LABELS[name]: {"items_s": args.batch_size / r["step_s"], "step_s": r["step_s"],
                           "peak_bytes": r["peak_bytes"], "losses": r["losses"]} for name, r in results.items()}},
            indent=1))
    if "packed-old" in results and "packed" in results:
        old, new = results["packed-old"], results["packed"]
        print(f"new path vs old path: {old['step_s'] / new['step_s']:.2f}x faster, "
              f"{new['peak_bytes'] / old['peak_bytes']:.2f}x the memory; last-step losses differ by at most "
              f"{max(abs(new['losses'][k] - v) / max(abs(v), 1e-12) for k, v in old['losses'].items()):.1e} "
              "(relative; the weights move the same way, so this also covers the updates)")


if __name__ == "__main__":
    main()
