"""``rematch tiny | encode | info``: create, use and inspect models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rematch.commands.common import non_negative_int, positive_int, read_jsonl
from rematch.commands.loading import add_model_loading_flags
from rematch.config import ROLES  # rematch.config is light (yaml, no torch)

OVERWRITE_HELP = ("accepted for scripts: the output path may be new, empty or a saved ReMatch model (replaced "
                  "whole); a folder holding anything else is refused, --overwrite or not")


def cmd_tiny(args: argparse.Namespace) -> int:
    from rematch import ReMatchModel

    model = ReMatchModel.tiny(size=args.size, backbone=args.backbone, num_tokens=args.num_tokens, seed=args.seed)
    model.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"saved an untrained {args.backbone}/{args.size} ReMatch model (K={args.num_tokens}) to {args.out}")
    return 0


def check_npy_output(path: str, overwrite: bool) -> Path:
    """``--out`` of ``encode``, checked before any work: a ``.npy`` path (``np.save`` would add the
    suffix itself, so the array landed next to where the message said) that is new, or an
    existing file replaced only with ``--overwrite`` (an array there may be the user's own)."""
    from rematch.outputs import check_new_file

    out = check_new_file(path, "the embeddings", overwrite=overwrite)
    if out.suffix != ".npy" or out.name == ".npy":
        raise ValueError(f"--out {path}: embeddings are written as a NumPy array; give a path ending in .npy")
    return out


def cmd_encode(args: argparse.Namespace) -> int:
    """One process, or every rank of ``torchrun`` (each encodes its share of the shards; rank 0 writes)."""
    from rematch.commands.loading import load_model
    from rematch.data.items import as_items
    from rematch.distributed import torchrun_session
    from rematch.encoding.shards import encode_to_npy

    out = check_npy_output(args.out, args.overwrite)
    where = f"{args.input} row"
    items = as_items(read_jsonl(args.input), where=where)
    with torchrun_session() as device:
        model = load_model(args.model, device or args.device, allow_untrained=args.allow_untrained)
        shape = encode_to_npy(model, items, out, role=args.role, batch_size=args.batch_size,
                              shard_size=args.shard_size, show_progress=True, where=where)
    if shape is not None:  # rank 0 (or the only process)
        print(f"wrote {shape[0]} x {shape[1]} {args.role} embeddings to {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print a saved model's rematch_config.json, checked as loading checks it. Reads that one
    file through the light reader (rematch.saved_model), so it answers without torch."""
    from rematch.hub.resolve import resolve_model_dir
    from rematch.saved_model import CONFIG_NAME, NotAReMatchModelError, read_rematch_meta

    directory = Path(resolve_model_dir(args.model, allow_patterns=[CONFIG_NAME]))  # a hub id: fetch only the config
    meta = read_rematch_meta(directory)
    if meta is None:
        raise NotAReMatchModelError(f"{args.model} is not a saved ReMatch model: {directory / CONFIG_NAME} "
                                    "is missing")
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    from rematch.hub.summary import summary_lines

    print("\n".join(summary_lines(meta, args.model)))
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from rematch import ReMatchModel

    # a one-off rewrite of the weights: the CPU holds whatever fits in RAM, a GPU might not
    model = ReMatchModel.from_pretrained(args.input, device="cpu")
    model.merge_lora().save_pretrained(args.output, overwrite=args.overwrite)
    print(f"merged the LoRA adapters of {args.input} into a standalone model at {args.output}")
    return 0


def register(sub) -> None:
    tiny = sub.add_parser("tiny", help="save an untrained offline tiny ReMatch model")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    tiny.add_argument("--backbone", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    tiny.add_argument("--num-tokens", type=non_negative_int, default=16, dest="num_tokens",
                      help="K, the learnable embedding tokens per role (0: last-token pooling) (default: 16)")
    tiny.add_argument("--k", type=non_negative_int, dest="num_tokens", help=argparse.SUPPRESS)  # the old spelling
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    tiny.set_defaults(func=cmd_tiny)

    encode = sub.add_parser("encode", help="embed the items of a jsonl file into a .npy array")
    encode.add_argument("--model", required=True, help="model directory, hub id, or tiny[:size[:family]]")
    encode.add_argument("--input", required=True, help="jsonl with text / image / instruction fields")
    encode.add_argument("--role", default="query", choices=ROLES,
                        help="query or document: which learnable tokens (and, for documents, the default "
                             "document instruction) the items get (default %(default)s)")
    encode.add_argument("--out", required=True, help="output .npy path")
    encode.add_argument("--batch-size", type=positive_int, default=16, help="items per forward (default %(default)s)")
    encode.add_argument("--shard-size", type=positive_int, default=4096,
                        help="items per shard; an interrupted run resumes from the finished shards, and under "
                             "torchrun each rank encodes its share of them (default %(default)s)")
    encode.add_argument("--overwrite", action="store_true",
                        help="replace the file at --out if there is one (by default an existing file is refused)")
    add_model_loading_flags(encode)
    encode.set_defaults(func=cmd_encode)

    merge = sub.add_parser("merge-lora", help="fold a trained model's LoRA adapters into its backbone")
    merge.add_argument("input", help="a saved ReMatch model with LoRA adapters (directory or hub id)")
    merge.add_argument("output", help="where to write the standalone model")
    merge.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    merge.set_defaults(func=cmd_merge_lora)

    info = sub.add_parser("info", help="summarise a saved model (backbone, heads, embedding, limits); --json for its "
                                       "whole rematch_config.json")
    info.add_argument("model", help="model directory or hub id")
    info.add_argument("--json", action="store_true",
                      help="print the whole rematch_config.json instead of the summary (default: the summary)")
    info.set_defaults(func=cmd_info)
