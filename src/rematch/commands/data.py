"""``rematch data check | synth``: validate MMEB-layout data; write the built-in shapes world."""

from __future__ import annotations

import argparse

from rematch.commands.common import non_negative_int, positive_int


def cmd_check(args: argparse.Namespace) -> int:
    from rematch.data.check import check_dataset, format_check

    results = check_dataset(args.root, image_root=args.image_root, split=args.split,
                            decode_images=not args.no_decode,
                            strip_orphan_placeholders=args.strip_orphan_placeholders,
                            max_examples=args.examples)
    print(format_check(results))
    return 0 if all(result.ok for result in results) else 1


def cmd_synth(args: argparse.Namespace) -> int:
    import json
    import time

    from rematch.world.tasks import write_shapes_dataset

    started = time.perf_counter()
    out = write_shapes_dataset(args.out, train_rows=args.train_rows, eval_queries=args.eval_queries, seed=args.seed,
                               num_candidates=args.candidates, fmt=args.format, image_size=args.image_size,
                               overwrite=args.overwrite, video_clips=args.video_clips, pages=args.pages,
                               frame_size=args.frame_size, video_mp4=args.video_mp4)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for subset, counts in manifest["subsets"].items():
        print(f"{subset:<14} {counts['meta_task']:<15} train {counts['train']:>7}  test {counts['test']:>6}")
    for task, counts in manifest.get("video", {}).get("tasks", {}).items():
        print(f"{task:<16} video {counts['category']:<15} clips: train {counts['train']:>4}  test {counts['test']:>4}")
    for task, counts in manifest.get("visdoc", {}).get("tasks", {}).items():
        print(f"{task:<16} visdoc {counts['category']:<14} pages: train {counts['train']['pages']:>4}  "
              f"test {counts['test']['pages']:>4}")
    print(f"wrote the shapes world to {out} ({manifest['images']} images, {time.perf_counter() - started:.1f} s); "
          f"check it with: rematch data check {out}")
    return 0


def register(sub) -> None:
    data = sub.add_parser("data", help="check MMEB-layout data; write the built-in shapes world")
    commands = data.add_subparsers(dest="data_command", required=True)

    check = commands.add_parser("check", help="report bad rows per subset (exit 1 if any)")
    check.add_argument("root", help="dataset root (ROOT/<Subset>/<split>.jsonl|parquet|csv) or one file")
    check.add_argument("--image-root", default=None, help="directory image paths are relative to (default: ROOT)")
    check.add_argument("--split", default="all", help="split to check: train, test, original, ... or all")
    check.add_argument("--no-decode", action="store_true",
                       help="only check that image files exist, do not decode them (faster)")
    check.add_argument("--strip-orphan-placeholders", action="store_true",
                       help="treat <|image_1|> without an image as a repair (counted), not an error")
    check.add_argument("--examples", type=non_negative_int, default=3, help="offending rows to show per problem")
    check.set_defaults(func=cmd_check)

    synth = commands.add_parser("synth", help="write the shapes world in MMEB-train / MMEB-eval layout")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--train-rows", type=non_negative_int, default=10_000)
    synth.add_argument("--eval-queries", type=non_negative_int, default=200, help="evaluation queries per subset")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--candidates", type=positive_int, default=100,
                       help="candidates per evaluation query (2 to 1000)")
    synth.add_argument("--format", default="jsonl", choices=["jsonl", "parquet"])
    synth.add_argument("--image-size", type=positive_int, default=112,
                       help="side of the square images in pixels (28 to 2048)")
    synth.add_argument("--video-clips", type=non_negative_int, default=0,
                       help="moving-shapes clips per video task and split, in MMEB-V2's video layouts "
                            "(DIR/video-tasks; default 0: none, e.g. 4)")
    synth.add_argument("--frame-size", type=positive_int, default=56,
                       help="side of the square video frames in pixels (even, 28 to 1024)")
    synth.add_argument("--video-mp4", action="store_true",
                       help="also encode every clip as an mp4 with PyAV (the PNG frames are always written)")
    synth.add_argument("--pages", type=non_negative_int, default=0,
                       help="rendered text pages per split, with one query each, in the ViDoRe layout "
                            "(DIR/visdoc-tasks; default 0: none, e.g. 8)")
    synth.add_argument("--overwrite", action="store_true",
                       help="accepted for scripts: --out may be new, empty or an earlier shapes world (replaced "
                            "whole); a folder with anything else in it is refused, --overwrite or not")
    synth.set_defaults(func=cmd_synth)
