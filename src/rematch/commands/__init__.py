"""Subcommands of the ``rematch`` CLI, one module per group.

Each module exposes ``register(subparsers)``, which adds its subcommands; every handler
parses flags and calls one library function, nothing more.
"""

from __future__ import annotations

import importlib

#: Modules under rematch.commands, in the order their commands appear in ``rematch --help``.
COMMAND_MODULES = ("demo", "model", "train", "pretrain", "data", "evaluate", "index", "mine", "serve", "export")


def register_all(subparsers) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"rematch.commands.{name}").register(subparsers)
