"""``rematch demo``: the main job on the built-in default."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from rematch.demo import run_quick_pipeline

    run_quick_pipeline(out=Path(args.out) if args.out else None)
    return 0


def register(sub) -> None:
    demo = sub.add_parser("demo", help="run the main job on the built-in default (tiny model, shapes world)")
    demo.add_argument("--out", default=None, help="directory for outputs")
    demo.set_defaults(func=cmd_demo)
