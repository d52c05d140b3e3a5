"""``rematch mine``: hard negatives for MMEB-train-style data, written as a new data root."""

from __future__ import annotations

import argparse
import json
import math

from rematch.commands.common import non_negative_int, positive_int
from rematch.commands.loading import add_model_loading_flags, load_model


#: A flag left at its default: the preset's value applies.
_PRESET = object()


def _max_ratio(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}")
    return value


def _rank_window(text: str) -> tuple[int, int]:
    from rematch.retrieval.mining import parse_rank_window

    try:
        return parse_rank_window(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cmd_mine(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rematch.retrieval.mining import MiningError, format_report, mine_negatives, mining_preset

    strategy = "random" if args.random else "mined"
    if args.teacher is not None:
        if args.model is not None and args.model != args.teacher:
            raise SystemExit("rematch mine: --teacher and --model name the same model; give one of them")
        args.model = args.teacher
    if args.model is None and strategy == "mined":
        raise SystemExit("rematch mine: --model is required (only --random runs without a model)")
    overrides = {name: value for name, value in (("rank_window", args.rank_window), ("max_ratio", args.max_ratio))
                 if value is not _PRESET}
    try:  # before loading a model
        settings = mining_preset(args.preset, per_row=args.per_row, seed=args.seed, strategy=strategy, **overrides)
    except MiningError as error:
        raise SystemExit(f"rematch mine: {error}") from error
    model = None
    if args.model is not None:  # negatives mined by untrained heads are random: refused unless asked for
        model = load_model(args.model, args.device, allow_untrained=args.allow_untrained)
    model_source = None
    if args.model is not None:  # what the report records: an absolute path for a local directory
        model_source = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    # a MiningError (a ValueError: the output is the data root, a subset has no rows...) ends as one
    # line "rematch: error: ..." like every other refusal of the input or the output path
    result = mine_negatives(model, args.data, args.out, settings, subsets=args.subsets, split=args.split,
                            image_root=args.image_root, batch_size=args.batch_size,
                            shard_size=args.shard_size, skip_bad=args.skip_bad,
                            strip_orphan_placeholders=args.strip_orphan_placeholders,
                            keep_embeddings=args.keep_embeddings, model_source=model_source,
                            preset=None if overrides else args.preset,
                            show_progress=args.progress, log=None if args.json else print)
    if args.json:
        print(json.dumps(json.loads(result.report_path.read_text(encoding="utf-8")), indent=2))
    else:
        print(format_report(result))
        print(f"report: {result.report_path}")
    return 0


def register(sub) -> None:
    mine = sub.add_parser("mine", help="mine hard negatives for MMEB-train-style data into a new data root "
                                       "(resumable)",
                          description="Encode every subset's targets, take each query's FAISS top-k, drop the "
                                      "positive and its near-duplicates and candidates scoring above max-ratio x "
                                      "the positive's score, draw --per-row from ranks a..b, and write "
                                      "OUT/<Subset>/<split>.jsonl (all input columns kept, image paths absolute, "
                                      "new neg_text / neg_image_path). A rerun resumes.")
    mine.add_argument("--model", default=None, help="model directory, hub id, or tiny[:size[:family]]")
    mine.add_argument("--data", required=True, help="MMEB-train root (ROOT/<Subset>/<split>.*), one file, or a HF id")
    mine.add_argument("--out", required=True, help="output root (same layout; must not be --data)")
    mine.add_argument("--subsets", nargs="+", default=None, help="subset names (default: every subset found)")
    mine.add_argument("--split", default="train", help="split to mine (MMEB-train snapshots: original)")
    mine.add_argument("--image-root", default=None, help="directory image paths are relative to (default: ROOT)")
    mine.add_argument("--preset", choices=("nv", "b3"), default="nv",
                      help="nv: ranks 5-30 under 0.95 x the positive's score; b3: B3's ranks 30-130 (70-170 for VQA "
                           "subsets), no ceiling, for a strong teacher (default: nv)")
    mine.add_argument("--teacher", default=None, metavar="MODEL",
                      help="the teacher model that ranks the candidates (same as --model)")
    mine.add_argument("--rank-window", type=_rank_window, default=_PRESET, metavar="A:B",
                      help="candidate ranks A..B (1-based, after removing the positive) to draw from (default: the "
                           "preset's)")
    mine.add_argument("--per-row", type=positive_int, default=1, help="negatives per row (lists when > 1; default 1)")
    mine.add_argument("--max-ratio", type=_max_ratio, default=_PRESET,
                      help="drop candidates scoring above this x the positive's score ('none': no ceiling; "
                           "default: the preset's)")
    mine.add_argument("--seed", type=non_negative_int, default=0, help="seed of the per-row draw")
    mine.add_argument("--random", action="store_true",
                      help="random negatives (uniform among non-duplicate targets) instead of mined ones: the "
                           "control; --model is then optional and only used for the report's similarities")
    mine.add_argument("--batch-size", type=positive_int, default=16)
    mine.add_argument("--shard-size", type=positive_int, default=2048, help="items per cached embedding shard")
    mine.add_argument("--skip-bad", action="store_true", help="leave bad rows out (counted) instead of stopping")
    mine.add_argument("--strip-orphan-placeholders", action="store_true",
                      help="drop (and count) an image placeholder in a text whose row has no image")
    mine.add_argument("--keep-embeddings", action="store_true",
                      help="keep the cached embedding shards after a subset is written (default: delete them)")
    add_model_loading_flags(mine)
    mine.add_argument("--progress", action="store_true", help="show encoding progress bars")
    mine.add_argument("--json", action="store_true", help="print the report as JSON only")
    mine.set_defaults(func=cmd_mine)
