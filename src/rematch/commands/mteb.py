"""``rematch eval mteb``: mteb's tasks (text, image, both) on a ReMatch model, see rematch.integrations.mteb_run.

Registered under ``rematch eval`` beside ``mmeb``, ``mmeb-v2`` and ``retrieval``
(:func:`register_under_eval`, called by rematch.commands.evaluate with its subcommand group);
mteb itself is an optional extra (``pip install 'rematch[mteb]'``) and is imported only when
the command runs.
"""

from __future__ import annotations

import argparse

from rematch.commands.common import positive_int
from rematch.commands.loading import add_model_loading_flags


def _require_mteb() -> None:
    import importlib.util

    if importlib.util.find_spec("mteb") is None:
        raise SystemExit("rematch eval mteb needs mteb: pip install 'rematch[mteb]'")


def cmd_mteb(args: argparse.Namespace) -> int:
    _require_mteb()
    from rematch.commands.loading import load_model
    from rematch.integrations.mteb import load_encoder
    from rematch.integrations.mteb_run import resolve_tasks, run_mteb

    resolve_tasks(args.tasks)  # an unknown task name fails before the model loads
    model = load_model(args.model, args.device, allow_untrained=args.allow_untrained)
    encoder = load_encoder(args.model, model=model, batch_size=args.batch_size)
    summary = run_mteb(encoder, args.tasks, args.out, overwrite=args.overwrite, show_progress=args.progress)
    print(f"wrote mteb's results for {len(summary['tasks'])} task(s) to {args.out} (summary.md, results/)")
    return 0


def register_under_eval(groups) -> None:
    """Add ``mteb`` to the subcommands of ``rematch eval`` (``groups``: that parser's subparsers)."""
    parser = groups.add_parser(
        "mteb", help="run mteb tasks (text, image, both; mteb's offline mock tasks too) on a model")
    parser.add_argument("--model", required=True, help="model directory, hub id, or tiny[:size[:family]]")
    parser.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                        help="mteb task names, e.g. MockAny2AnyRetrievalT2I MockRetrievalTask (mteb's offline mock "
                             "tasks) or any task of mteb's registry (downloaded by mteb)")
    parser.add_argument("--out", required=True, help="output directory: mteb's results/ and summary.json, summary.md")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="items per forward (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="run every task again (default: tasks whose results are in --out are reused)")
    parser.add_argument("--progress", action="store_true", help="show mteb's progress bars (default: hidden)")
    add_model_loading_flags(parser)
    parser.set_defaults(func=cmd_mteb)
