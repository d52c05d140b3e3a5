"""The ``rematch`` command line. Thin: each subcommand parses flags and calls one library function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

Command = Callable[[argparse.Namespace], int]


def _load_model(spec: str, device: str | None):
    """``tiny`` / ``tiny:small`` / ``tiny:small:qwen2_5_vl`` build offline; anything else is a path or hub id."""
    from rematch import ReMatchModel

    if spec.startswith("tiny"):
        parts = spec.split(":")
        size = parts[1] if len(parts) > 1 else "tiny"
        family = parts[2] if len(parts) > 2 else "qwen2_vl"
        model = ReMatchModel.tiny(size=size, backbone=family)
        return model.to(device) if device else model
    return ReMatchModel.from_pretrained(spec, device=device)


# ----------------------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace) -> int:
    from rematch.demo import run_quick_pipeline

    run_quick_pipeline(out=Path(args.out) if args.out else None)
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from rematch import ReMatchModel

    model = ReMatchModel.tiny(size=args.size, backbone=args.backbone, k=args.k, seed=args.seed)
    model.save_pretrained(args.out)
    print(f"saved an untrained {args.backbone}/{args.size} ReMatch model (K={args.k}) to {args.out}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from rematch.data.items import as_items

    rows = _read_jsonl(Path(args.input))
    items = as_items(rows, where=f"{args.input} row")
    model = _load_model(args.model, args.device)
    vectors = model.encode(items, role=args.role, batch_size=args.batch_size, show_progress=True)
    np.save(args.out, vectors)
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} {args.role} embeddings to {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from rematch.serialization import CONFIG_NAME

    meta = json.loads((Path(args.model) / CONFIG_NAME).read_text(encoding="utf-8"))
    print(json.dumps(meta, indent=2))
    return 0


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise SystemExit(f"{path}: line {number} is not valid JSON ({error})") from error
    return rows


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rematch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the main job on the built-in default (tiny model, shapes world)")
    demo.add_argument("--out", default=None, help="directory for outputs")
    demo.set_defaults(func=cmd_demo)

    tiny = sub.add_parser("tiny", help="save an untrained offline tiny ReMatch model")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    tiny.add_argument("--backbone", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    tiny.add_argument("--k", type=int, default=16)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny)

    encode = sub.add_parser("encode", help="embed the items of a jsonl file into a .npy array")
    encode.add_argument("--model", required=True, help="model directory, hub id, or tiny[:size[:family]]")
    encode.add_argument("--input", required=True, help="jsonl with text / image / instruction fields")
    encode.add_argument("--role", default="query", choices=["query", "document"])
    encode.add_argument("--out", required=True, help="output .npy path")
    encode.add_argument("--batch-size", type=int, default=16)
    encode.add_argument("--device", default=None)
    encode.set_defaults(func=cmd_encode)

    info = sub.add_parser("info", help="print a saved model's rematch_config.json")
    info.add_argument("model")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
