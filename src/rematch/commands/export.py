"""``rematch export`` and ``rematch push``: share a model without rematch, or on the hub with a card."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

OVERWRITE_HELP = ("replace an earlier export of the other --format at OUT (default: OUT must be new, empty or an "
                  "export of the same format); a folder holding anything else is refused, --overwrite or not")
UNTRAINED_HELP = "allow a model whose ReMatch heads are untrained (random), e.g. for a smoke test (default: refused)"


def _load(spec: str):
    """The model on the CPU (a one-off rewrite of the weights: RAM holds what a GPU might not) and its directory."""
    from rematch import ReMatchModel
    from rematch.hub.resolve import resolve_model_dir

    model = ReMatchModel.load(spec, device="cpu")
    if Path(spec).expanduser().is_dir():
        return model, Path(spec).expanduser()
    return model, (resolve_model_dir(spec) if model.heads_source else None)  # a hub id (its snapshot), or tiny


def cmd_export(args: argparse.Namespace) -> int:
    from rematch.evaluation.report import read_eval_table
    from rematch.export import export_model

    from rematch.export.exporter import check_export_target

    if args.eval is not None:
        read_eval_table(args.eval)  # an unreadable summary fails before the model loads
    check_export_target(Path(args.out), args.format, args.overwrite)  # so does an export of the other format
    model, model_dir = _load(args.model)
    out = export_model(model, args.out, args.format, overwrite=args.overwrite, model_dir=model_dir,
                       eval_dir=args.eval, allow_untrained=args.allow_untrained)
    how = "SentenceTransformer(OUT, trust_remote_code=True)" if args.format == "sentence-transformers" else \
        "transformers (see rematch_embedding.py in it)"
    print(f"exported {args.model} to {out} ({args.format} format: load it with {how})")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from rematch.evaluation.report import read_eval_table
    from rematch.hub.push import check_repo_id, stage_model_directory, upload_folder
    from rematch.hub.resolve import resolve_model_dir

    check_repo_id(args.repo_id)
    model_dir = resolve_model_dir(args.model)
    fingerprint = table = None
    if args.eval is not None:
        table = read_eval_table(args.eval)  # readable, before the model loads
        from rematch import ReMatchModel

        fingerprint = ReMatchModel.from_pretrained(model_dir, device="cpu").fingerprint()  # whose scores these are
    with tempfile.TemporaryDirectory(prefix="rematch-push-") as tmp:
        staged = stage_model_directory(model_dir, Path(tmp) / "staged", args.repo_id, eval_table=table,
                                       fingerprint=fingerprint, license=args.license,
                                       allow_untrained=args.allow_untrained)
        url = upload_folder(staged, args.repo_id, private=args.private)
    print(f"pushed {args.model} to {url}")
    return 0


def register(sub) -> None:
    export = sub.add_parser("export", help="write a model that runs without rematch (transformers or "
                                           "sentence-transformers)")
    export.add_argument("model", help="a saved ReMatch model (directory or hub id)")
    export.add_argument("out", help="the directory to write")
    export.add_argument("--format", default="transformers", choices=["transformers", "sentence-transformers"],
                        help="transformers: a plain Qwen-VL checkpoint, the learnable tokens in its vocabulary; "
                             "sentence-transformers: the same plus a module for SentenceTransformer "
                             "(default %(default)s)")
    export.add_argument("--eval", default=None, metavar="EVAL_DIR",
                        help="an `rematch eval mmeb` output directory of this model: its scores go on the card "
                             "(default: no scores)")
    export.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    export.add_argument("--allow-untrained", action="store_true", help=UNTRAINED_HELP)
    export.set_defaults(func=cmd_export)

    push = sub.add_parser("push", help="upload a saved model to the Hugging Face hub, with a model card")
    push.add_argument("model", help="a saved ReMatch model directory (or hub id)")
    push.add_argument("repo_id", help="hub repository, org/name (created if new)")
    push.add_argument("--eval", default=None, metavar="EVAL_DIR",
                      help="an `rematch eval mmeb` output directory of this model: its scores go on the card "
                           "(default: no scores)")
    push.add_argument("--private", action="store_true", help="create the repository as private (default: public)")
    push.add_argument("--license", default=None,
                      help="license identifier for the card, e.g. apache-2.0 (default: none on the card)")
    push.add_argument("--allow-untrained", action="store_true", help=UNTRAINED_HELP)
    push.set_defaults(func=cmd_push)
