"""The ``rematch`` command line. Thin: each subcommand parses flags and calls one library function.

The subcommands live in ``rematch.commands.<group>`` modules.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    from rematch.commands import register_all

    parser = argparse.ArgumentParser(prog="rematch", description="ReMatch multimodal retrieval")
    sub = parser.add_subparsers(dest="command", required=True)
    register_all(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "train":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
