"""The ``rematch`` command line. Thin: each subcommand parses flags and calls one library function.

The subcommands live in ``rematch.commands.<group>`` modules. Errors about the user's input
are printed as one line, ``rematch: error: ...``, with exit status 1 (see
:mod:`rematch.commands.errors`); ``rematch --debug ...`` shows their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    from rematch.commands import register_all

    parser = argparse.ArgumentParser(prog="rematch", description="ReMatch multimodal retrieval")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: REMATCH_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    register_all(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from rematch.commands.errors import is_user_error, one_line

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "accepts_overrides", False):  # a subcommand declares it takes --section.key
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    debug = args.debug or os.environ.get("REMATCH_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("rematch: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted into user errors and bugs just below
        if debug or not is_user_error(error):
            raise
        print(f"rematch: error: {one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
