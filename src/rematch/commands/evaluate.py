"""``rematch eval mmeb | mmeb-v2 | retrieval``: the MMEB protocols and whole-corpus retrieval evaluation.

Both run on one process or under ``torchrun`` (each rank encodes a shard; rank 0 writes).
"""

from __future__ import annotations

import argparse
import json

from rematch.commands.common import non_negative_int, positive_int
from rematch.commands.mteb import register_under_eval
from rematch.config import TARGET_PROMPT_STYLES  # light: PyYAML only


def _cache_dir(args: argparse.Namespace):
    from rematch.encoding.cache import default_cache_dir

    return None if args.no_cache else (args.cache_dir or default_cache_dir())


def _model(args: argparse.Namespace, device: str | None):
    from rematch.commands.loading import load_model

    return load_model(args.model, device or args.device, allow_untrained=args.allow_untrained)


def cmd_mmeb(args: argparse.Namespace) -> int:
    from rematch.distributed import is_main_process, torchrun_session
    from rematch.evaluation.mmeb import evaluate_mmeb_source
    from rematch.evaluation.report import compare_summaries, load_summary

    if args.model is None and args.data is None:
        if not args.compare:
            raise SystemExit("rematch eval mmeb: give --model and --data to evaluate, or --compare OTHER_OUT "
                             "to compare the run in --out with another")
        print(compare_summaries(load_summary(args.compare), load_summary(args.out), names=(args.compare, args.out)))
        return 0
    if args.model is None or args.data is None:
        raise SystemExit("rematch eval mmeb: --model and --data go together")
    _check_limit_flags(args)  # bad values fail before the model is loaded
    with torchrun_session() as device:
        model = _model(args, device)
        summary = evaluate_mmeb_source(
            model, args.data, args.out, subsets=args.subsets, split=args.split,
            image_root=args.image_root, skip_bad=args.skip_bad, batch_size=args.batch_size,
            strip_orphan_placeholders=args.strip_orphan_placeholders, limits=_input_limits(args, model),
            overwrite=args.overwrite,
            cache_dir=_cache_dir(args), plot=not args.no_plot, rerank=args.rerank, show_progress=args.progress,
            target_prompt_style=args.target_prompt_style)
        if args.compare and is_main_process():
            print(compare_summaries(load_summary(args.compare), summary, names=(args.compare, args.out)))
    return 0


def _check_limit_flags(args: argparse.Namespace) -> None:
    """The input-limit flags, before any model is loaded: the official preset resolves without
    one; with the model's own limits at least the flags must agree with each other."""
    if args.input_limits == "official":
        _input_limits(args, None)
    elif args.min_pixels is not None and args.max_pixels is not None and args.min_pixels > args.max_pixels:
        _input_limits(args, None)


def _input_limits(args: argparse.Namespace, model):
    """The input limits of ``eval mmeb``: the --input-limits preset with --min/--max-pixels, --max-text-tokens."""
    from rematch.evaluation.settings import InputLimitsError, resolve_limits

    if args.min_pixels is not None and args.max_pixels is not None and args.min_pixels > args.max_pixels:
        raise InputLimitsError(f"--min-pixels ({args.min_pixels}) > --max-pixels ({args.max_pixels}): give a "
                               "smallest image area at most the largest")
    try:
        return resolve_limits(args.input_limits, model, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                              max_text_tokens=args.max_text_tokens)
    except InputLimitsError as error:  # one line "rematch: error: ...", the flags named as the user wrote them
        message = str(error)
        for name in ("min_pixels", "max_pixels", "max_text_tokens"):
            message = message.replace(name, "--" + name.replace("_", "-"))
        raise InputLimitsError(message) from None


def cmd_mmeb_v2(args: argparse.Namespace) -> int:
    from rematch.distributed import torchrun_session
    from rematch.evaluation.mmeb_v2 import evaluate_mmeb_v2

    if args.rerank:
        raise SystemExit("rematch eval mmeb-v2: --rerank is not supported yet (use eval mmeb for image tasks)")
    _check_limit_flags(args)  # bad values fail before the model is loaded
    with torchrun_session() as device:
        model = _model(args, device)
        evaluate_mmeb_v2(model, args.data, args.out, modalities=args.modalities, tasks=args.tasks,
                         skip_bad=args.skip_bad, image_root=args.image_root, batch_size=args.batch_size,
                         cache_dir=_cache_dir(args), limits=_input_limits(args, model), overwrite=args.overwrite,
                         show_progress=args.progress, video_frames=args.video_frames or None)
    return 0


def cmd_retrieval(args: argparse.Namespace) -> int:
    from rematch.distributed import is_main_process, torchrun_session
    from rematch.evaluation.retrieval import evaluate_retrieval, read_qrels
    from rematch.retrieval.corpus import read_corpus

    queries = read_corpus(args.queries, args.image_root, instruction=args.query_instruction)
    corpus = read_corpus(args.corpus, args.image_root, instruction=args.document_instruction)
    qrels = read_qrels(args.qrels, queries.ids, corpus.ids)
    with torchrun_session() as device:
        result = evaluate_retrieval(
            _model(args, device), queries.ids, queries.items, corpus.ids, corpus.items, qrels, ks=args.ks,
            batch_size=args.batch_size, cache_dir=_cache_dir(args), rerank=args.rerank, out_dir=args.out,
            show_progress=args.progress, log=None if args.json else print)
        if args.json and is_main_process():
            print(json.dumps(result, indent=2))
    return 0


def cmd_generative(args: argparse.Namespace) -> int:
    from rematch.evaluation.generative import (
        check_result_directory, evaluate_generative, format_table, load_generative_model, write_result)

    if args.out:
        check_result_directory(args.out)  # before the model loads and the evaluation runs
    model = load_generative_model(args.model, image_size=args.image_size, device=args.device)
    result = evaluate_generative(model, per_type=args.scenes, seed=args.seed, batch_size=args.batch_size,
                                 image_position=args.image_position)
    print(format_table(result))
    if args.out:
        print(f"written: {write_result(result, args.out)}")
    return 0


def _common(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    from rematch.commands.loading import ALLOW_UNTRAINED_HELP

    parser.add_argument("--model", required=model_required, help="model directory, hub id, or tiny[:size[:family]]")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--device", default=None, help="e.g. cuda:1 or cpu (default: cuda when available, else "
                                                       "cpu; torchrun picks cuda:LOCAL_RANK itself)")
    parser.add_argument("--allow-untrained", action="store_true", help=ALLOW_UNTRAINED_HELP)
    parser.add_argument("--cache-dir", default=None,
                        help="embedding cache directory (default $REMATCH_CACHE_DIR or ~/.cache/rematch/embeddings)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    parser.add_argument("--rerank", type=non_negative_int, default=0, metavar="N",
                        help="rerank the top N with the matching head (p(Yes) of the generative branch)")
    parser.add_argument("--progress", action="store_true", help="show encoding progress bars")


def register(sub) -> None:
    evaluate = sub.add_parser("eval", help="evaluate a model (MMEB protocol, corpus retrieval)")
    groups = evaluate.add_subparsers(dest="eval_command", required=True)

    mmeb = groups.add_parser("mmeb", help="MMEB protocol: rank each query's own candidates, write per-subset and "
                                          "summary reports (or compare two runs)")
    _common(mmeb, model_required=False)
    mmeb.add_argument("--data", default=None,
                      help="MMEB-eval root (ROOT/<Subset>/test.jsonl|parquet), one file, or a HF id "
                           "(TIGER-Lab/MMEB-eval)")
    mmeb.add_argument("--subsets", nargs="+", default=None, help="subset names (default: every subset found)")
    mmeb.add_argument("--split", default="test")
    mmeb.add_argument("--image-root", default=None, help="directory the rows' image paths are relative to")
    mmeb.add_argument("--skip-bad", action="store_true", help="skip (and count) unusable rows instead of stopping")
    mmeb.add_argument("--strip-orphan-placeholders", action="store_true",
                      help="drop (and count) an image placeholder in a row without an image (MMEB's WebQA quirk)")
    mmeb.add_argument("--input-limits", choices=("official", "model"), default="official",
                      help="image/text limits to encode with: 'official' = the MMEB-V1 Qwen2-VL evaluation (images "
                           "3136-1003520 pixels, no text truncation; the default), 'model' = the model's own "
                           "training limits; the flags below override single values")
    mmeb.add_argument("--min-pixels", type=positive_int, default=None, help="smallest image area in pixels")
    mmeb.add_argument("--max-pixels", type=positive_int, default=None,
                      help="largest image area in pixels (official: 1003520 = 28*28*1280)")
    mmeb.add_argument("--max-text-tokens", type=non_negative_int, default=None,
                      help="truncate texts to this many tokens (0 = never; official: 0)")
    mmeb.add_argument("--target-prompt-style", choices=TARGET_PROMPT_STYLES, default=None,
                      help="encode candidates in this target prompt style (default: the style the model was "
                           "trained with)")
    mmeb.add_argument("--out", required=True, help="output directory (<Subset>.json, summary.json/.md/.png)")
    mmeb.add_argument("--no-plot", action="store_true")
    mmeb.add_argument("--overwrite", action="store_true",
                      help="remove per-subset results of another model found in --out (default: refuse)")
    mmeb.add_argument("--compare", default=None, metavar="OTHER_OUT",
                      help="print this run next to another run's summary, with deltas")
    mmeb.set_defaults(func=cmd_mmeb)

    v2 = groups.add_parser("mmeb-v2", help="MMEB-V2 (image, video and visual-document tasks in their published "
                                           "layouts): per-task JSON and a summary in the official layout")
    _common(v2)
    v2.add_argument("--data", required=True, help="MMEB-V2 root holding image-tasks/, video-tasks/, visdoc-tasks/")
    v2.add_argument("--out", required=True, help="output directory (<Task>.json, summary.json, summary.md)")
    v2.add_argument("--modalities", nargs="+", choices=("image", "video", "visdoc"),
                    default=["image", "video", "visdoc"], help="which modalities to evaluate (default: all)")
    v2.add_argument("--video-frames", type=non_negative_int, default=8,
                    help="frames per video, taken as the official harness takes them (np.linspace over the saved "
                         "frames); 0: the model's own video_fps / video_max_frames sampling (default: 8)")
    v2.add_argument("--tasks", nargs="+", default=None, help="task names (default: every task found under --data)")
    v2.add_argument("--skip-bad", action="store_true", help="skip (and count) unusable rows instead of stopping")
    v2.add_argument("--image-root", default=None,
                    help="directory the image tasks' image paths are relative to (default: DATA/image-tasks)")
    for flag, kind, text in (("--min-pixels", positive_int, "smallest image area in pixels"),
                             ("--max-pixels", positive_int, "largest image area in pixels"),
                             ("--max-text-tokens", non_negative_int, "truncate texts to this many tokens (0 = never)")):
        v2.add_argument(flag, type=kind, default=None, help=text)
    v2.add_argument("--input-limits", choices=("official", "model"), default="official",
                    help="image/text limits to encode with (as for eval mmeb; default: the official MMEB-V1 ones)")
    v2.add_argument("--overwrite", action="store_true",
                    help="remove per-task results of another model found in --out (default: refuse)")
    v2.set_defaults(func=cmd_mmeb_v2)

    retrieval = groups.add_parser("retrieval", help="rank the whole corpus for each query: recall@k, nDCG@10, MRR")
    _common(retrieval)
    retrieval.add_argument("--queries", required=True, help="jsonl: id, text, image, instruction")
    retrieval.add_argument("--corpus", required=True, help="jsonl file, directory of jsonl files, or image directory")
    retrieval.add_argument("--qrels", required=True, help="relevance: .tsv (BEIR), .txt (TREC) or .jsonl")
    retrieval.add_argument("--image-root", default=None, help="base of relative image paths (default: each "
                                                              "file's directory)")
    retrieval.add_argument("--query-instruction", default=None, help="instruction for queries that have none")
    retrieval.add_argument("--document-instruction", default=None, help="instruction for documents that have none")
    retrieval.add_argument("--ks", type=positive_int, nargs="+", default=[1, 5, 10, 100], help="cut-offs for recall@k")
    retrieval.add_argument("--out", default=None, help="directory for retrieval.json")
    retrieval.add_argument("--json", action="store_true", help="print the result as JSON only")
    retrieval.set_defaults(func=cmd_retrieval)

    generative = groups.add_parser(
        "generative", help="the backbone as an MLLM on held-out scenes: accuracy per question type, Yes/No "
                           "verification of true captions and compositional foils")
    generative.add_argument("--model", required=True,
                            help="tiny-pretrained, a `rematch pretrain` model directory, a backbone or ReMatch "
                                 "model directory, or a hub id")
    generative.add_argument("--scenes", type=positive_int, default=200,
                            help="held-out scenes per question type (and per true-caption / foil group)")
    generative.add_argument("--seed", type=int, default=0, help="seed of the held-out scene stream")
    generative.add_argument("--image-size", type=positive_int, default=None,
                            help="image side in pixels (default: what the model was pre-trained at, else 112)")
    generative.add_argument("--image-position", choices=("first", "last"), default=None,
                            help="each image before its question (the chat format's default) or after it (default: "
                                 "as the model was pre-trained, data.image_position; first for any other model)")
    generative.add_argument("--batch-size", type=positive_int, default=64)
    generative.add_argument("--device", default=None, help="e.g. cuda:1 or cpu (default: cuda when available)")
    generative.add_argument("--out", default=None, help="directory for generative.json")
    generative.set_defaults(func=cmd_generative)
    register_under_eval(groups)  # mteb's tasks, last: an optional extra
