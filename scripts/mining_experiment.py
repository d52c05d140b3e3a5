"""Do mined hard negatives beat random ones? A measurement on the built-in shapes world.

    python scripts/mining_experiment.py --out runs/mining-experiment [--seeds 3] [--steps 150]

1. writes the shapes world (training rows + ShapesT2I / ShapesI2T evaluation subsets, each
   query ranked against 20 candidates: its compositional perturbations, then random scenes);
2. trains a *mining model* briefly on it without hard negatives (``loss.hard_negatives
   false``, seed 100, so it is none of the compared runs);
3. ``rematch mine`` with that model (default rank window and ceiling) -> ``mined/``, and
   ``rematch mine --random`` (each row's negative = a random other target of its subset)
   -> ``random/``; both print their per-subset similarity report;
4. trains the same demo-sized recipe (``configs/demo-tiny.yaml``: full ReMatch, hard
   negatives on, matching on 1/4 of each batch as the demo does) on each, for every seed,
   and evaluates hit@1 / MRR on ShapesT2I and ShapesI2T with the MMEB protocol
   (``rematch eval mmeb``). ``--conditions handmade`` adds the world's own hand-made
   compositional negatives as a reference;
5. writes ``results.json`` and ``results.md`` (mean +- standard deviation over seeds).

Every step goes through the real command line (``rematch.cli.main``), in this process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rematch.cli import main as rematch

SUBSETS = ("ShapesT2I", "ShapesI2T")
SHAPES_SUBSETS = ("ShapesCLS", "ShapesVQA", "ShapesT2I", "ShapesI2T", "ShapesGround")
CONDITIONS = ("random", "mined", "handmade")


def train(config: str, data: Path, out: Path, steps: int, seed: int, subsets: list[str] | None,
          *extra: str) -> Path:
    if not (out / "model").is_dir():
        chosen = ["--data.subsets", "[" + ", ".join(subsets) + "]"] if subsets else []
        rematch(["train", "--config", config, "--data", str(data), "--out", str(out), "--steps", str(steps),
                 "--seed", str(seed), "--no-progress", "--model.seed", str(seed), "--model.min_pixels", "3136",
                 "--model.max_pixels", "3136", "--train.save_every", "0", "--loss.matching_samples", "4",
                 *chosen, *extra])
    return out / "model"


def evaluate(model: Path, world: Path, out: Path) -> dict:
    if not (out / "summary.json").is_file():
        rematch(["eval", "mmeb", "--model", str(model), "--data", str(world), "--subsets", *SUBSETS,
                 "--out", str(out), "--no-cache", "--no-plot"])
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return {name: {metric: summary["subsets"][name][metric] for metric in ("hit@1", "mrr")} for name in SUBSETS}


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * deviation:.1f}"


def signed(value: float | None) -> str:
    return f"{value:+.3f}" if value is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/mining-experiment")
    parser.add_argument("--config", default="configs/demo-tiny.yaml")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--eval-queries", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=20, help="candidates per evaluation query")
    parser.add_argument("--conditions", nargs="+", default=["random", "mined"], choices=CONDITIONS)
    parser.add_argument("--rank-window", default="5:30", help="passed to rematch mine")
    parser.add_argument("--max-ratio", default="0.95", help="passed to rematch mine ('none': no ceiling)")
    parser.add_argument("--train-subsets", nargs="+", default=None, choices=SHAPES_SUBSETS,
                        help="subsets to mine and train on (default: all five)")
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()

    world = out / "world"
    if not (world / "manifest.json").is_file():
        from rematch.world.tasks import write_shapes_dataset

        write_shapes_dataset(world, train_rows=args.train_rows, eval_queries=args.eval_queries, seed=0,
                             num_candidates=args.candidates, image_size=56)
    subsets = ["--subsets", *args.train_subsets] if args.train_subsets else []
    miner = train(args.config, world, out / "mining-model", args.steps, 100, args.train_subsets,
                  "--loss.hard_negatives", "false")
    rematch(["mine", "--model", str(miner), "--data", str(world), "--out", str(out / "mined"),
             "--rank-window", args.rank_window, "--max-ratio", args.max_ratio, *subsets])
    rematch(["mine", "--random", "--model", str(miner), "--data", str(world), "--out", str(out / "random"),
             *subsets])

    data = {"random": out / "random", "mined": out / "mined", "handmade": world}
    results: dict[str, list[dict]] = {condition: [] for condition in args.conditions}
    for seed in range(args.seeds):
        for condition in args.conditions:
            run = out / "runs" / condition / f"seed{seed}"
            model = train(args.config, data[condition], run, args.steps, seed, args.train_subsets)
            results[condition].append({"seed": seed, **evaluate(model, world, run / "eval")})
            print(f"{condition} seed {seed}: {results[condition][-1]}", flush=True)

    mining = {condition: json.loads((out / condition / "mining_report.json").read_text(encoding="utf-8"))
              for condition in ("random", "mined")}
    lines = ["| negatives | T2I hit@1 | I2T hit@1 | T2I MRR x100 | I2T MRR x100 |", "|---|---|---|---|---|"]
    for condition in args.conditions:
        runs = results[condition]
        cells = [spread([r[name][metric] for r in runs]) for metric in ("hit@1", "mrr") for name in SUBSETS]
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    lines += ["", "| subset | q.pos | q.neg (mined) | q.neg (random) | rows without a mined negative |",
              "|---|---|---|---|---|"]
    for name, report in mining["mined"]["subsets"].items():
        random_report = mining["random"]["subsets"][name]
        lines.append(f"| {name} | {signed(report['mean_query_positive'])} | {signed(report['mean_query_negative'])} "
                     f"| {signed(random_report['mean_query_negative'])} | {report['without']}/{report['rows']} |")
    (out / "results.json").write_text(json.dumps({"results": results, "mining": mining,
                                                  "seconds": round(time.perf_counter() - started, 1)},
                                                 indent=2), encoding="utf-8")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
