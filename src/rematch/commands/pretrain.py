"""``rematch pretrain``: generative pre-training of a tiny Qwen2-VL on the shapes world."""

from __future__ import annotations

import argparse
import os

from rematch.commands.common import positive_int

STABLE_FLAGS = {"out": "train.out", "steps": "train.steps", "seed": "train.seed"}


def cmd_pretrain(args: argparse.Namespace) -> int:
    from rematch.commands.train import run_overrides
    from rematch.training.pretrain import load_pretrain_config, pretrain

    config = load_pretrain_config(args.config, run_overrides(args, STABLE_FLAGS))
    result = pretrain(config, show_progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, only the main process reports
        return 0
    final = f"; final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    print(f"pre-trained {result.steps} steps in {result.seconds:.1f}s{final}")
    print(f"backbone: {result.model_dir}" + (f"   loss curve: {result.loss_plot}" if result.loss_plot else ""))
    return 0


def register(sub) -> None:
    pretrain = sub.add_parser(
        "pretrain", help="pre-train a tiny Qwen2-VL to answer questions about the built-in world",
        description="Next-token pre-training (answers only) from random initialisation on the shapes world's "
                    "captions, questions and caption verification; the result is a backbone directory usable as "
                    "--model.backbone DIR. Any config key can be overridden as --section.key value, e.g. "
                    "--model.image_size 168 --train.lr 2e-3.")
    pretrain.add_argument("--config", default=None, help="YAML recipe (see configs/pretrain-tiny.yaml)")
    pretrain.add_argument("--out", default=None, help="run directory (train.out)")
    pretrain.add_argument("--steps", type=positive_int, default=None, help="optimisation steps (train.steps)")
    pretrain.add_argument("--seed", type=int, default=None, help="training seed (train.seed)")
    pretrain.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    pretrain.add_argument("--overwrite", action="store_true",
                          help="start over in a run directory that holds a previous run (deletes its outputs)")
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bar")
    pretrain.set_defaults(func=cmd_pretrain, overrides=[], accepts_overrides=True)
