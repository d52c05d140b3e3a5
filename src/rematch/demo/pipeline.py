"""``rematch demo``: shapes world -> ablation training -> MMEB evaluation -> index -> report.

Everything runs offline on a CPU: the built-in shapes world is generated once, every
ablation row fine-tunes the same backbone (``settings.backbone``: the random tiny one, or
the shipped pretrained one with ``--from-scratch`` as a row of its own) with the same data,
budget and seeds, evaluated on the five shapes subsets with the MMEB protocol (first stage,
and reranked by the matching head for the rows that trained it). The full model then
indexes the evaluation images for two example searches and runs the world's video and page
tasks (MMEB-V2 layouts). ``report.md`` collects the numbers; every number in it comes from
these runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rematch.config import Config, apply_overrides, dump_yaml
from rematch.demo.settings import RANDOM_BACKBONE, SUBSETS, AblationRow, DemoSettings


@dataclass
class RunRecord:
    """One (row, seed): where it ran and what it measured."""

    row: str
    seed: int
    directory: Path
    train: dict[str, Any]
    evaluation: dict[str, Any]
    reranked: dict[str, Any] | None = None


@dataclass
class DemoResult:
    settings: DemoSettings
    records: list[RunRecord]
    report: Path
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    searches: list[dict] = field(default_factory=list)
    video_and_pages: dict[str, Any] | None = None


def row_config(settings: DemoSettings, row: AblationRow, seed: int, data_root: Path, out: Path) -> Config:
    """The full training config of one ablation row: shared settings, then the row's overrides."""
    side = settings.image_size
    shared = {
        "model.backbone": settings.backbone, "model.tiny_family": "qwen2_vl", "model.tiny_size": "tiny",
        "model.seed": seed, "model.min_pixels": side * side, "model.max_pixels": side * side,
        "data.source": str(data_root), "data.subsets": list(SUBSETS),
        "loss.temperature": settings.temperature,
        "loss.matching_samples": max(1, settings.batch_size // 4),  # as the paper recipes: 1/4 of the batch
        "lora.enabled": False,
        "train.out": str(out), "train.steps": settings.steps, "train.batch_size": settings.batch_size,
        "train.lr": settings.lr, "train.seed": seed, "train.warmup_ratio": 0.05,
        # the paper trains LoRA on the language model and leaves a pretrained vision tower as it
        # is; a random tower has to learn to see, so it trains
        "train.freeze_vision": settings.backbone != RANDOM_BACKBONE,
        "train.save_every": 0, "train.plot": True,
        "train.overwrite": True,  # the demo owns its run folders: a rerun starts each row afresh
    }
    return apply_overrides(Config(), {**shared, **row.overrides})


def prepare_data(settings: DemoSettings, log: Callable[[str], None]) -> Path:
    """Generate the shapes world (training rows with hard negatives + the five evaluation subsets) once."""
    from rematch.world.tasks import write_shapes_dataset

    root = settings.out / "data" / "shapes"
    marker = root / ".demo-complete"
    wanted = {"train_rows": settings.train_rows, "eval_queries": settings.eval_queries,
              "candidates": settings.eval_candidates, "video_clips": settings.video_clips, "pages": settings.pages}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        log(f"reusing the shapes world in {root}")
        return root
    log(f"generating the shapes world: {settings.train_rows} training rows, {settings.eval_queries} queries x "
        f"{settings.eval_candidates} candidates for each of {len(SUBSETS)} evaluation subsets")
    marker.unlink(missing_ok=True)  # not part of the world: write_shapes_dataset replaces only a world's own files
    write_shapes_dataset(root, train_rows=settings.train_rows, eval_queries=settings.eval_queries, seed=0,
                         num_candidates=settings.eval_candidates, video_clips=settings.video_clips,
                         pages=settings.pages)
    marker.write_text(json.dumps(wanted), encoding="utf-8")
    return root


def train_and_evaluate(settings: DemoSettings, row: AblationRow, seed: int, data_root: Path) -> RunRecord:
    """Fine-tune one (row, seed) and evaluate it (first stage, and reranked when the row trains
    the matching head). Self-contained, so it runs the same in this process or in a worker."""
    from rematch.model import ReMatchModel
    from rematch.evaluation.mmeb import evaluate_mmeb_source
    from rematch.training.loop import train

    directory = settings.out / "runs" / row.name / f"seed{seed}"
    config = row_config(settings, row, seed, data_root, directory)
    result = train(config, show_progress=False, log=lambda *_: None)
    train_summary = json.loads((directory / "train_summary.json").read_text(encoding="utf-8"))
    model = ReMatchModel.from_pretrained(result.model_dir)
    quiet = None
    # the demo owns its output folders: a rerun replaces the results of the previous run's models
    evaluation = evaluate_mmeb_source(model, str(data_root), directory / "eval", subsets=list(SUBSETS),
                                      cache_dir=settings.out / "cache", plot=False, log=quiet, overwrite=True)
    reranked = None
    if row.uses_matching and settings.rerank_top:
        reranked = evaluate_mmeb_source(model, str(data_root), directory / "eval-rerank", subsets=list(SUBSETS),
                                        cache_dir=settings.out / "cache", plot=False, log=quiet,
                                        rerank=settings.rerank_top, overwrite=True)
    return RunRecord(row.name, seed, directory, train_summary, evaluation, reranked)


def record_line(record: RunRecord) -> str:
    """The terminal's one line for a finished (row, seed)."""
    overall = record.evaluation["groups"]["overall"]["hit@1"]
    return (f"  {record.row:<14} seed {record.seed}: trained {record.train['steps']} steps in "
            f"{record.train['seconds']:.0f}s ({record.train['samples_per_second']:.1f} samples/s), "
            f"overall hit@1 {100 * overall:.1f}%"
            + (f", reranked {100 * record.reranked['groups']['overall']['hit@1']:.1f}%" if record.reranked else ""))


def run_rows(settings: DemoSettings, data_root: Path, log: Callable[[str], None]) -> list[RunRecord]:
    """Every (row, seed) of the ablation, in ``settings.worker_count`` processes.

    The rows are independent (own run folder, own seed; the embedding cache is one SQLite
    file per model), and one tiny model uses one core well but not two
    (:attr:`DemoSettings.threads`), so on a machine with N cores N rows train side by side,
    each in a worker process with the same thread count as a sequential run: a row's
    numbers do not depend on the worker count (tests/test_demo.py checks this). The
    heaviest rows (multi-token, matching) are handed out first so the workers finish
    together. Records come back in row order whatever order the rows finish in.
    """
    jobs = [(row, seed) for seed in range(settings.seeds) for row in settings.selected_rows()]
    workers = settings.worker_count(len(jobs))
    if workers == 1:
        records = []
        for row, seed in jobs:
            records.append(train_and_evaluate(settings, row, seed, data_root))
            log(record_line(records[-1]))
        return records
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: a forked child inherits the parent's OpenMP thread pool state mid-use
    context = multiprocessing.get_context("spawn")
    records: list[RunRecord | None] = [None] * len(jobs)
    heaviest_first = sorted(range(len(jobs)), key=lambda i: (-jobs[i][0].cost, i))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=quiet_process,
                             initargs=(settings.threads,)) as pool:
        futures = {pool.submit(train_and_evaluate, settings, jobs[i][0], jobs[i][1], data_root): i
                   for i in heaviest_first}
        try:
            for future in as_completed(futures):
                records[futures[future]] = future.result()
                log(record_line(records[futures[future]]))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return records


def video_and_page_tasks(settings: DemoSettings, data_root: Path, model_dir: Path) -> dict[str, Any] | None:
    """The full model on the world's video and page tasks (MMEB-V2 layouts: text -> video
    retrieval, motion classification, video QA; text -> page retrieval), so the demo runs
    both new modalities end to end. The model was fine-tuned on images only: these numbers
    show the path works and what transfers, not a trained video retriever."""
    if not (settings.video_clips or settings.pages):
        return None
    from rematch.model import ReMatchModel
    from rematch.evaluation.mmeb_v2 import evaluate_mmeb_v2

    model = ReMatchModel.from_pretrained(model_dir)
    summary = evaluate_mmeb_v2(model, data_root, settings.out / "eval-video-pages", modalities=("video", "visdoc"),
                               cache_dir=settings.out / "cache", overwrite=True, log=None)
    return {name: {"metric": result["primary_metric"], "score": result["score"], "queries": result["count"]}
            for name, result in summary["tasks"].items()}


T2I_INSTRUCTION = "Find me an everyday image that matches the given caption:"


def example_searches(settings: DemoSettings, data_root: Path, model_dir: Path) -> list[dict]:
    """Index the ShapesT2I evaluation images with the full model and run two caption searches:
    the first evaluation query (its correct image is known) and a free-text one."""
    from rematch.model import ReMatchModel
    from rematch.data.mmeb import iter_eval_examples
    from rematch.retrieval.index import build_index

    model = ReMatchModel.from_pretrained(model_dir)
    examples = list(iter_eval_examples(str(data_root), "ShapesT2I"))
    paths = sorted({str(c.image) for e in examples for c in e.candidates if c.image is not None})
    items = [{"image": path, "text": "Represent the given image."} for path in paths]
    index = build_index(model, items, [Path(p).name for p in paths], settings.out / "index", overwrite=True,
                        log=None)
    first = examples[0]
    queries = [(first.query.text, Path(str(first.candidates[0].image)).name),
               (f"{T2I_INSTRUCTION} a large red circle", None)]
    searches = []
    for text, correct in queries:
        hits = index.search([{"text": text}], k=5)[0]
        searches.append({"query": text, "correct": correct,
                         "hits": [{"rank": h.rank, "id": h.id, "score": round(h.score, 4)} for h in hits]})
    return searches


def quiet_process(threads: int) -> tuple[int, bool]:
    """Set this process up as the demo runs in it: ``threads`` torch threads and no
    weight-loading / shard-writing progress bars from transformers (the terminal shows one
    line per row instead). Returns the previous (threads, bars enabled). Also what every
    demo worker process runs first."""
    import torch
    from transformers.utils import logging as transformers_logging

    previous = torch.get_num_threads(), transformers_logging.is_progress_bar_enabled()
    torch.set_num_threads(threads)
    transformers_logging.disable_progress_bar()
    return previous


@contextlib.contextmanager
def demo_environment(threads: int):
    """:func:`quiet_process` for the duration of the block, put back afterwards."""
    import torch
    from transformers.utils import logging as transformers_logging

    old_threads, bars = quiet_process(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if bars:
            transformers_logging.enable_progress_bar()


def run_demo(settings: DemoSettings, log: Callable[[str], None] = print) -> DemoResult:
    """Run the whole demo and write ``settings.out/report.md``; returns what was measured."""
    with demo_environment(settings.threads):
        return _run_demo(settings, log)


#: What the demo writes into its output folder (the demo's own, recorded in its output marker).
DEMO_OUTPUTS = ("data", "runs", "cache", "index", "eval-video-pages", "report.md", "loss_curves.png",
                "retrieval_examples.png", "demo_results.json", "full_config.yaml")


def check_demo_output(out: Path):
    """Claim ``out`` for the demo: new, empty or an earlier demo's folder, and no file of the
    user's under one of :data:`DEMO_OUTPUTS` (checked before the long run, not after it)."""
    from rematch.outputs import claim_outputs

    return claim_outputs(out, "demo", DEMO_OUTPUTS, adopt=_earlier_demo)


def _earlier_demo(directory: Path) -> set[str]:
    """A demo folder written before output markers: its ``demo_results.json`` names its settings and rows."""
    try:
        results = json.loads((directory / "demo_results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not (isinstance(results, dict) and {"settings", "records"} <= set(results)):
        return set()
    return {name for name in DEMO_OUTPUTS if (directory / name).exists()}


def _run_demo(settings: DemoSettings, log: Callable[[str], None]) -> DemoResult:
    from rematch.demo.report import write_report

    started = time.perf_counter()
    outputs = check_demo_output(settings.out)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    data_root = prepare_data(settings, log)
    timings["data"] = time.perf_counter() - clock
    clock = time.perf_counter()
    records = run_rows(settings, data_root, log)
    timings["train_and_evaluate"] = time.perf_counter() - clock
    clock = time.perf_counter()
    full = [r for r in records if r.row == "full" and r.seed == 0]
    searches = example_searches(settings, data_root, full[0].directory / "model") if full else []
    timings["index_and_search"] = time.perf_counter() - clock
    clock = time.perf_counter()
    other_modalities = video_and_page_tasks(settings, data_root, full[0].directory / "model") if full else None
    timings["video_and_pages"] = time.perf_counter() - clock
    seconds = time.perf_counter() - started
    command = "rematch " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "rematch demo"
    report = write_report(settings, records, data_root, searches, timings, seconds, command, other_modalities)
    (settings.out / "demo_results.json").write_text(json.dumps({
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()},
        "seconds": round(seconds, 1), "timings": {k: round(v, 1) for k, v in timings.items()},
        "records": [{"row": r.row, "seed": r.seed, "directory": str(r.directory),
                     "train_seconds": r.train["seconds"], "samples_per_second": r.train["samples_per_second"],
                     "final_losses": r.train["final_losses"],
                     "hit@1": {name: r.evaluation["subsets"][name]["hit@1"] for name in SUBSETS},
                     "overall": r.evaluation["groups"]["overall"]["hit@1"],
                     "reranked_overall": r.reranked["groups"]["overall"]["hit@1"] if r.reranked else None}
                    for r in records],
        "searches": searches, "video_and_pages": other_modalities}, indent=2), encoding="utf-8")
    if full:
        dump_yaml(row_config(settings, next(r for r in settings.selected_rows() if r.name == "full"), 0, data_root,
                             full[0].directory), settings.out / "full_config.yaml")
    outputs.seal()
    return DemoResult(settings, records, report, seconds, timings, searches, other_modalities)
