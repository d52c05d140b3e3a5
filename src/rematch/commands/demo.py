"""``rematch demo``: the main job on the built-in default (tiny model, shapes world, ablation, report)."""

from __future__ import annotations

import argparse

from rematch.commands.common import non_negative_int, positive_int
from rematch.demo.settings import BACKBONES


def cmd_demo(args: argparse.Namespace) -> int:
    from rematch.demo import DemoSettings, run_demo
    from rematch.demo.report import terminal_table

    settings = DemoSettings.create(out=args.out, quick=args.quick, seeds=args.seeds, steps=args.steps,
                                   backbone=args.backbone, from_scratch=args.from_scratch,
                                   rows=tuple(args.rows) if args.rows else None, workers=args.workers,
                                   eval_queries=args.eval_queries)
    result = run_demo(settings)
    print()
    if args.quick:  # a 12-step run says nothing about the method: only that every stage runs
        print(f"SMOKE TEST (--quick: {settings.steps} steps per row, small subsets): these numbers only show that "
              "the pipeline runs end to end; run `rematch demo` for the measured tables")
    print("Precision@1 (hit@1, %) on the built-in shapes world:")
    print(terminal_table(result.records, settings))
    print(f"\nreport: {result.report}   ({result.seconds / 60:.1f} min)")
    return 0


def register(sub) -> None:
    demo = sub.add_parser("demo", help="train + ablate + evaluate a tiny ReMatch model on the built-in world")
    demo.add_argument("--out", default="runs/demo", help="output directory (report.md, runs/, data/)")
    demo.add_argument("--quick", action="store_true", help="a ~2 minute smoke run with tiny sizes")
    demo.add_argument("--seeds", type=positive_int, default=1, help="seeds per ablation row (mean and spread)")
    demo.add_argument("--steps", type=positive_int, default=None, help="training steps per row (default 300; quick 12)")
    demo.add_argument("--eval-queries", type=positive_int, default=None,
                      help="queries per evaluation subset (default 100: one query is at most 1 point of hit@1; "
                           "quick 10)")
    demo.add_argument("--rows", nargs="+", default=None, help="only these ablation rows (default: all six)")
    demo.add_argument("--backbone", choices=BACKBONES, default="tiny-pretrained",
                      help="what every row fine-tunes: the shipped generatively pretrained tiny Qwen2-VL (112 px, "
                           "docs/pretraining.md; the default) or the random one (56 px)")
    demo.add_argument("--from-scratch", action="store_true",
                      help="add the full recipe from a random backbone as a row of its own (what pre-training buys)")
    demo.add_argument("--workers", type=non_negative_int, default=None,
                      help="rows trained side by side in worker processes (default 0: one per core; 1: in this "
                           "process, one after another; the numbers are the same either way)")
    demo.set_defaults(func=cmd_demo)
