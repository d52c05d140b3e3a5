"""Encode throughput: ReMatchModel.encode vs a plain transformers forward with last-token pooling.

Both sides use the same backbone weights, the same items (text-only, image-only, mixed,
of varied length) and the same batch size, and both load and process images inside the
timed loop. "plain" is what a user would write with transformers alone: processor ->
model forward -> last hidden state of the last token, batches in input order. Ours adds
K learnable tokens, M-RoPE ids computed by the adapter and length-sorted batching.

    python benchmarks/bench_encode.py                          # tiny model, CPU
    python benchmarks/bench_encode.py --backbone-size 3b --device cuda --dtype bfloat16 --image-size 448

Also, side by side in the same run (issue 14): encode with preprocessing in line (the old
path, ``prefetch=0``, the default on CPU) vs prefetched in a background thread (``prefetch=2``,
the default on a GPU), and the padded embedding forward vs the padding-free one (``model.padding_free``). Peak
memory is CUDA's max allocated per row (CPU: not measured per row).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from rematch import ReMatchModel
from rematch.backbones.tiny import count_parameters
from rematch.data.images import load_image_for_model
from rematch.data.items import Item, as_items
from rematch.world.scenes import COLOURS, SHAPES, Scene, ShapeObject, caption, render


def make_items(count: int, image_size: int, folder: Path, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for index in range(count):
        scene = Scene((ShapeObject(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(["small", "large"]),
                                   rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75)),))
        text = caption(scene) + (" with some more words" * rng.randint(0, 12))
        kind = index % 3
        if kind == 0:
            items.append(Item(text=text))
            continue
        path = folder / f"{index}.png"
        render(scene, side=image_size).save(path)
        items.append(Item(image=str(path)) if kind == 1 else Item(text=f"<|image_1|> {text}", image=str(path)))
    return items


def plain_transformers_encode(model: ReMatchModel, items: list[Item], batch_size: int) -> torch.Tensor:
    """The baseline: HF processor + HF forward, last-token pooling, no extra tokens."""
    processor, backbone, config = model.processor, model.backbone, model.config
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            texts = [model.adapter.format_item(item, 0) for item in chunk]
            images = [load_image_for_model(item.image, config.min_pixels, config.max_pixels)
                      for item in chunk if item.image is not None]
            inputs = processor(text=texts, images=images or None, padding=True, padding_side="left",
                               return_tensors="pt", return_mm_token_type_ids=True).to(model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.backbone_dtype)
            hidden = backbone.model(**inputs).last_hidden_state[:, -1]
            outputs.append(torch.nn.functional.normalize(hidden.float(), dim=-1).cpu())
    return torch.cat(outputs)


PEAKS: dict[str, int] = {}


def timed(function, repeats: int, label: str = "") -> float:
    best = float("inf")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    if cuda and label:
        PEAKS[label] = torch.cuda.max_memory_allocated()
    return best


def peak(label: str) -> str:
    return f"  peak {PEAKS[label] / 2**30:6.2f} GiB" if label in PEAKS else ""


def with_padding_free(model: ReMatchModel, on: bool) -> None:
    model.config = dataclasses.replace(model.config, padding_free=on)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone-size", default="tiny", choices=["tiny", "small", "base", "2b", "3b", "7b"])
    parser.add_argument("--family", default=None, help="qwen2_vl or qwen2_5_vl (default: qwen2_vl, 3b/7b: 2.5)")
    parser.add_argument("--items", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-padding-free", action="store_true",
                        help="skip the padding-free row (on a GPU without flash-attn its T x T mask is large)")
    parser.add_argument("--json", help="also write the numbers to this file (benchmarks/gpu_check.py reads it)")
    args = parser.parse_args()

    family = args.family or ("qwen2_5_vl" if args.backbone_size in ("3b", "7b") else "qwen2_vl")
    max_pixels = max(448 * 448, args.image_size ** 2)
    model = ReMatchModel.tiny(size=args.backbone_size, backbone=family, num_tokens=args.k, dtype=args.dtype,
                              max_pixels=max_pixels, device=args.device).eval()
    with tempfile.TemporaryDirectory() as folder:
        items = as_items(make_items(args.items, args.image_size, Path(folder)))
        # warm-up (allocator, kernels, lazy imports) on a few items of each kind
        model.encode(items[:6], batch_size=args.batch_size)
        plain_transformers_encode(model, items[:6], args.batch_size)
        ours = timed(lambda: model.encode(items, batch_size=args.batch_size, prefetch=2), args.repeats, "ours")
        plain = timed(lambda: plain_transformers_encode(model, items, args.batch_size), args.repeats, "plain")
        # the same baseline given our length-sorted batches: isolates the cost of the K tokens
        by_length = sorted(items, key=lambda item: -model.adapter.estimate_length(item))
        plain_sorted = timed(lambda: plain_transformers_encode(model, by_length, args.batch_size), args.repeats,
                             "plain sorted")
        inline = timed(lambda: model.encode(items, batch_size=args.batch_size, prefetch=0), args.repeats, "inline")
        packed, packed_cosine = float("nan"), float("nan")
        if not args.no_padding_free:
            with_padding_free(model, True)
            model.encode(items[:6], batch_size=args.batch_size)  # warm-up of the packed shapes
            packed = timed(lambda: model.encode(items, batch_size=args.batch_size), args.repeats, "packed")
            with_padding_free(model, False)
            vectors = model.encode(items, batch_size=args.batch_size)
            with_padding_free(model, True)
            packed_cosine = float((vectors * model.encode(items, batch_size=args.batch_size)).sum(axis=1).min())
            with_padding_free(model, False)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"date {date.today()}  device {args.device} ({device_name})  threads {torch.get_num_threads()}")
    print(f"backbone {family}/{args.backbone_size} ({count_parameters(model.backbone) / 1e6:.1f}M params, "
          f"{args.dtype})  items {len(items)}  batch {args.batch_size}  image {args.image_size}px  K={args.k}")
    print(f"attention: {model.config.attn_implementation} -> vision "
          f"{model.adapter.causal_lm(model.backbone).config.vision_config._attn_implementation}, text "
          f"{model.adapter.causal_lm(model.backbone).config.text_config._attn_implementation}")
    print(f"plain transformers forward, last token : {len(items) / plain:8.1f} items/s{peak('plain')}")
    print(f"plain, batches sorted by length        : {len(items) / plain_sorted:8.1f} items/s{peak('plain sorted')}")
    print(f"encode, preprocessing in line (old)    : {len(items) / inline:8.1f} items/s{peak('inline')}")
    print(f"ReMatchModel.encode (K={args.k:2d}, prefetch) : {len(items) / ours:8.1f} items/s{peak('ours')}")
    print(f"encode, padding-free forward           : {len(items) / packed:8.1f} items/s{peak('packed')}")
    print(f"ratio ours / plain                      : {plain / ours:8.2f}x  (target >= 0.90; GPU 3b: >= 3)")
    print(f"ratio ours / plain sorted (K overhead)  : {plain_sorted / ours:8.2f}x")
    print(f"ratio prefetch / in line (new / old)    : {inline / ours:8.2f}x")
    print(f"ratio padding-free / padded             : {ours / packed:8.2f}x  (min cosine to padded "
          f"{packed_cosine:.6f})")
    if args.json:
        rates = {"plain": plain, "plain sorted": plain_sorted, "encode, in line (old)": inline,
                 "encode, prefetch (new)": ours, "encode, padding-free": packed}
        Path(args.json).write_text(json.dumps({
            "device": device_name, "backbone": f"{family}/{args.backbone_size}", "dtype": args.dtype,
            "image": args.image_size, "items": len(items), "batch": args.batch_size,
            "rows": {label: {"items_s": len(items) / seconds, "peak_bytes": PEAKS.get(key)}
                     for (label, seconds), key in zip(rates.items(),
                                                      ["plain", "plain sorted", "inline", "ours", "packed"])},
        }, indent=1))


if __name__ == "__main__":
    main()
