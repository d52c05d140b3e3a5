"""``rematch train``: train a ReMatch model from a YAML recipe plus command-line overrides."""

from __future__ import annotations

import argparse
import os

from rematch.commands.common import positive_int
from rematch.config import ConfigError

STABLE_FLAGS = {"out": "train.out", "steps": "train.steps", "seed": "train.seed", "data": "data.source"}


def parse_overrides(extra: list[str]) -> list[str]:
    """``--a.b value`` / ``--a.b=value`` pairs -> ["a.b=value", ...]; anything else is an error."""
    overrides, index = [], 0
    while index < len(extra):
        token = extra[index]
        if not token.startswith("--") or "." not in token.split("=", 1)[0]:
            raise ConfigError(f"unrecognised argument {token!r} (config overrides look like --section.key value)")
        if "=" in token:
            overrides.append(token[2:])
            index += 1
        else:
            if index + 1 >= len(extra):
                raise ConfigError(f"{token} needs a value")
            overrides.append(f"{token[2:]}={extra[index + 1]}")
            index += 2
    return overrides


def run_overrides(args: argparse.Namespace, stable_flags: dict[str, str]) -> list[str]:
    """The config overrides of a training-style command: ``--section.key value`` pairs, then its
    stable flags (``--out``, ``--steps``...) and ``--resume`` / ``--overwrite``, which win."""
    overrides = parse_overrides(args.overrides)
    for flag, key in stable_flags.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.resume:
        overrides.append("train.resume=true")
    if args.overwrite:
        overrides.append("train.overwrite=true")
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    from rematch.config import load_config
    from rematch.training.loop import train

    config = load_config(args.config, run_overrides(args, STABLE_FLAGS))
    result = train(config, show_progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, only the main process reports
        return 0
    losses = ", ".join(f"{k} {v:.4f}" for k, v in result.final_losses.items())
    print(f"trained {result.steps} steps in {result.seconds:.1f}s ({result.samples_per_second:.1f} samples/s); "
          f"final {losses}")
    print(f"model: {result.model_dir}" + (f"   loss curves: {result.loss_plot}" if result.loss_plot else ""))
    return 0


def register(sub) -> None:
    train = sub.add_parser("train", help="train a ReMatch model (YAML recipe + --section.key overrides)",
                           description="Any config key can be overridden as --section.key value, e.g. "
                                       "--model.num_tokens 8 --loss.matching 0.2 --lora.enabled false")
    train.add_argument("--config", default=None, help="YAML recipe (see configs/)")
    train.add_argument("--out", default=None, help="run directory (train.out)")
    train.add_argument("--steps", type=positive_int, default=None, help="optimisation steps (train.steps)")
    train.add_argument("--seed", type=int, default=None, help="random seed (train.seed)")
    train.add_argument("--data", default=None, help="MMEB root, HF dataset id, jsonl/csv, or builtin (data.source)")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="start over in a run directory that holds a previous run (deletes that run's outputs)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train, overrides=[], accepts_overrides=True)
