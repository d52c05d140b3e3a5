"""The demo's report: ablation table, rerank table, loss curves, retrieval examples, timings.

Every number is read from the runs' own outputs (train_summary.json, the MMEB
summaries, the index searches); nothing here is typed in.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Sequence

from rematch.demo.settings import ALL_ROWS, COMPOSITIONAL, SUBSETS, DemoSettings
from rematch.matching import VIEW_KINDS

GROUPS = ("classification", "vqa", "retrieval", "grounding", "overall")
COLUMNS = (*SUBSETS, *GROUPS)
SHORT = {"ShapesCLS": "CLS", "ShapesVQA": "VQA", "ShapesT2I": "T2I", "ShapesI2T": "I2T", "ShapesGround": "Ground",
         "classification": "cls", "vqa": "vqa", "retrieval": "ret", "grounding": "grd", "overall": "overall"}


def score(evaluation: dict, column: str, metric: str = "hit@1") -> float:
    if column in SUBSETS:
        return 100 * evaluation["subsets"][column][metric]
    return 100 * evaluation["groups"][column][metric]


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one seed)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_cell(values: Sequence[float], digits: int = 1) -> str:
    """The mean over seeds, with the spread when there is more than one (scores: 1 digit, losses: 3)."""
    mean, spread = mean_spread(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def table(records, rows, metric: str = "hit@1", which: str = "evaluation") -> list[list[str]]:
    """One line per ablation row: label, then every column's value over seeds."""
    lines = []
    for row in rows:
        runs = [getattr(r, which) for r in records if r.row == row.name and getattr(r, which) is not None]
        if runs:
            lines.append([row.label] + [format_cell([score(run, column, metric) for run in runs])
                                        for column in COLUMNS])
    return lines


def markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def text_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    render = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(line) for line in lines])


def compositional_gap(records, metric: str) -> dict | None:
    """full - baseline on the compositional subsets, per seed, with the seed spread."""
    by_seed = {}
    for record in records:
        if record.row in ("full", "baseline"):
            by_seed.setdefault(record.seed, {})[record.row] = record.evaluation
    pairs = [runs for runs in by_seed.values() if len(runs) == 2]
    if not pairs:
        return None
    gaps = {}
    for subset in COMPOSITIONAL:
        diffs = [score(p["full"], subset, metric) - score(p["baseline"], subset, metric) for p in pairs]
        spreads = [mean_spread([score(p[row], subset, metric) for p in pairs])[1] for row in ("full", "baseline")]
        gaps[subset] = {"gap": statistics.fmean(diffs), "spread": max(spreads), "seeds": len(pairs)}
    return gaps


#: The share of a run's last logged steps the rerank table averages its losses over: one
#: step's matching loss is a handful of pairs, too noisy to say where the head ended.
LAST_STEPS_SHARE = 0.1


def last_steps_means(directory: Path, columns: Sequence[str]) -> dict[str, float]:
    """Each column's mean over the last 10% of a run's logged steps (at least one), from its
    ``losses.jsonl``; a column the log does not have (a run older than it) is left out."""
    from rematch.training.logs import read_log

    rows = read_log(directory / "losses.jsonl")
    last = rows[-max(1, math.ceil(LAST_STEPS_SHARE * len(rows))):] if rows else []
    means = {}
    for column in columns:
        values = [row[column] for row in last if column in row]
        if values:
            means[column] = statistics.fmean(values)
    return means


def matching_cells(runs) -> list[str]:
    """The rerank table's matching cells of one row: per view kind the loss and the accuracy
    (``0.693 / 50%``), then the matching loss; each a mean over the row's last steps, then over seeds."""
    columns = ["matching", *(f"matching_loss/{kind}" for kind in VIEW_KINDS),
               *(f"matching_accuracy/{kind}" for kind in VIEW_KINDS)]
    means = [last_steps_means(run.directory, columns) for run in runs]

    def values(column: str, scale: float = 1.0) -> list[float]:
        return [scale * m[column] for m in means if column in m]

    cells = []
    for kind in VIEW_KINDS:
        losses, accuracies = values(f"matching_loss/{kind}"), values(f"matching_accuracy/{kind}", 100.0)
        cells.append(f"{format_cell(losses, 3)} / {format_cell(accuracies, 0)}%" if losses and accuracies else "-")
    matching = values("matching")
    return cells + [format_cell(matching, digits=3) if matching else "-"]


def plot_loss_curves(records, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rematch.training.logs import read_log, smooth

    terms = ("loss", "contrastive", "orthogonality", "matching")
    figure, axes = plt.subplots(1, len(terms), figsize=(4.2 * len(terms), 3.4))
    for row in ALL_ROWS:
        run = next((r for r in records if r.row == row.name and r.seed == 0), None)
        if run is None:
            continue
        log = read_log(run.directory / "losses.jsonl")
        for axis, term in zip(axes, terms):
            points = [(entry["step"], entry[term]) for entry in log if term in entry]
            if points:
                values = [v for _, v in points]
                axis.plot([s for s, _ in points], smooth(values, max(1, len(values) // 15)), label=row.name)
    for axis, term in zip(axes, terms):
        axis.set_title(term)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("training losses (seed 0, moving average)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_retrieval_examples(model_dir: Path, data_root: Path, path: Path) -> Path:
    """A ShapesT2I query with its top-5 images and a ShapesI2T query image with its top-5 captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from rematch.model import ReMatchModel
    from rematch.data.mmeb import iter_eval_examples

    model = ReMatchModel.from_pretrained(model_dir)
    figure, axes = plt.subplots(2, 6, figsize=(13, 5.2))
    for line, subset in enumerate(("ShapesT2I", "ShapesI2T")):
        example = next(iter(iter_eval_examples(str(data_root), subset)))
        query = model.encode([example.query], role="query")
        candidates = model.encode(list(example.candidates), role="document")
        order = (query @ candidates.T)[0].argsort()[::-1][:5]
        head = axes[line][0]
        if example.query.image is not None:
            head.imshow(Image.open(example.query.image).convert("RGB"))
        head.set_title(_wrap(_strip(example.query.text) if example.query.image is None else "query image"),
                       fontsize=7)
        for rank, index in enumerate(order, start=1):
            axis = axes[line][rank]
            candidate = example.candidates[index]
            correct = index == 0
            if candidate.image is not None:
                axis.imshow(Image.open(candidate.image).convert("RGB"))
            else:
                axis.text(0.5, 0.5, _wrap(candidate.text or ""), ha="center", va="center", fontsize=7,
                          transform=axis.transAxes)
            axis.set_title(f"#{rank}" + (" (correct)" if correct else ""), fontsize=8,
                           color="green" if correct else "black")
            for spine in axis.spines.values():
                spine.set_edgecolor("green" if correct else "lightgray")
                spine.set_linewidth(3 if correct else 1)
        for axis in axes[line]:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle("full ReMatch, seed 0: top-5 candidates (correct one in green)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _strip(text: str | None) -> str:
    return (text or "").replace("<|image_1|>", "").strip()


def _wrap(text: str, width: int = 28) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:6])


def _workers(settings: DemoSettings) -> str:
    count = settings.worker_count(settings.seeds * len(settings.selected_rows()))
    return "one process, one after another" if count == 1 else f"{count} worker processes side by side"


def write_report(settings: DemoSettings, records, data_root: Path, searches: list[dict], timings: dict,
                 seconds: float, command: str, video_and_pages: dict | None = None) -> Path:
    out = settings.out
    rows = settings.selected_rows()
    header = ["row", *(SHORT[c] for c in COLUMNS)]
    hit_lines = table(records, rows, "hit@1")
    mrr_lines = table(records, rows, "mrr")
    rerank_rows = [row for row in rows if row.uses_matching]
    rerank_lines = []
    for row in rerank_rows:
        runs = [r for r in records if r.row == row.name and r.reranked is not None]
        if runs:
            first = [format_cell([score(r.evaluation, c) for r in runs]) for c in (*COMPOSITIONAL, "overall")]
            second = [format_cell([score(r.reranked, c) for r in runs]) for c in (*COMPOSITIONAL, "overall")]
            rerank_lines.append([row.label] + [f"{a} -> {b}" for a, b in zip(first, second)] + matching_cells(runs))
    loss_plot = plot_loss_curves(records, out / "loss_curves.png")
    full = next((r for r in records if r.row == "full" and r.seed == 0), None)
    example_plot = plot_retrieval_examples(full.directory / "model", data_root, out / "retrieval_examples.png") \
        if full else None
    gap = compositional_gap(records, "hit@1")
    mrr_gap = compositional_gap(records, "mrr")
    lines = [
        "# rematch demo report", "",
        f"Command: `{command}`  ",
        f"Total time: {seconds / 60:.1f} min on this machine ({_machine()}), the rows trained by "
        f"{_workers(settings)}; "
        + ", ".join(f"{k.replace('_', ' ')} {v:.0f}s" for k, v in timings.items()) + ".", "",
        f"Setting: {_start(settings)}, built-in shapes world "
        f"({settings.train_rows} training rows, one hard negative each), {settings.steps} steps x batch "
        f"{settings.batch_size}, lr {settings.lr}, temperature {settings.temperature}, {settings.image_size} px, "
        f"{settings.seeds} seed(s) (0..{settings.seeds - 1}; the seed sets the initialisation of the new weights, "
        f"of a random backbone too, and the data order). "
        f"Evaluation: MMEB protocol on {settings.eval_queries} queries per subset x up to "
        f"{settings.eval_candidates} candidates (classification and VQA rank their whole label/answer set).", "",
        "## Ablation (Precision@1 = hit@1, %)", "",
        markdown_table(header, hit_lines), "",
        "Columns: the five subsets, then meta-task means (cls, vqa, ret, grd) and the overall mean."
        + (" Values are mean ± standard deviation over seeds." if settings.seeds > 1 else ""), "",
        "## Ablation (MRR x 100)", "", markdown_table(header, mrr_lines), "",
    ]
    if gap:
        lines += ["## The question the demo asks", "",
                  "Is full ReMatch above the baseline on the compositional hard-negative subsets by more than "
                  "the seed spread?", ""]
        for name, metric_gap in (("hit@1", gap), ("MRR x 100", mrr_gap)):
            for subset, value in metric_gap.items():
                if value["seeds"] > 1:
                    verdict = "yes" if value["gap"] > value["spread"] else "no"
                else:
                    verdict = "one seed, no spread to compare with (run --seeds 3)"
                lines.append(f"- {subset}, {name}: full - baseline = {value['gap']:+.2f}, "
                             f"largest seed spread {value['spread']:.2f} -> {verdict}")
        lines.append("")
    if rerank_lines:
        lines += [f"## Reranking the top {settings.rerank_top} with the matching head (hit@1 %, first stage -> "
                  "reranked)", "",
                  markdown_table(["row", *(SHORT[c] for c in (*COMPOSITIONAL, "overall")), *VIEW_KINDS,
                                  "matching loss"], rerank_lines), "",
                  "Matching loss: the row's matching loss over its last 10% of training steps (mean); "
                  f"ln 2 = {math.log(2):.3f} is a head that cannot tell a relevant document from a hard negative "
                  "(p(Yes) = 0.5 for both); reranking with such a head reorders the candidates by noise. "
                  "raw-raw ... soft-soft: the same per kind of (query view, document view) pair, raw content or "
                  "the soft token of its embedding, as loss / accuracy (p(Yes) > p(No) against the label; 50% "
                  "is chance); each kind is a quarter of the pairs, so the four losses average to the matching "
                  "loss.", ""]
    lines += ["## Training and evaluation throughput", "",
              markdown_table(["row", "seed", "train s", "samples/s", "final losses", "eval items/s"],
                             [[r.row, str(r.seed), f"{r.train['seconds']:.0f}", f"{r.train['samples_per_second']:.1f}",
                               ", ".join(f"{k} {v:.3f}" for k, v in r.train["final_losses"].items()),
                               f"{r.evaluation['throughput'].get('items_per_second', 0):.0f}"] for r in records]), "",
              "## Loss curves", "", f"![loss curves]({loss_plot.name})", ""]
    if example_plot:
        lines += ["## Retrieval examples", "", f"![retrieval examples]({example_plot.name})", ""]
    if searches:
        lines += ["## Index and search (full model, ShapesT2I evaluation images)", ""]
        for search in searches:
            found = ", ".join(f"{h['id']} ({h['score']:.3f})" + (" <- correct" if h["id"] == search["correct"] else "")
                              for h in search["hits"])
            lines += [f"- `{search['query']}`: {found}"]
        lines += [""]
    if video_and_pages:
        lines += ["## Video and page tasks (full model, MMEB-V2 layouts)", "",
                  markdown_table(["task", "metric", "score %", "queries"],
                                 [[name, row["metric"], f"{100 * row['score']:.1f}", str(row["queries"])]
                                  for name, row in video_and_pages.items()]), "",
                  "The world's moving-shapes clips (as frame sequences through the backbone's video path) and "
                  "rendered text pages. Every row was fine-tuned on images only, so these show the two "
                  "modalities running end to end and what transfers, not a trained video or page retriever. "
                  "`rematch eval mmeb-v2` computed them (`eval-video-pages/`).", ""]
    lines += ["## Reproduce", "", "```", command, "```", "",
              "The full row's training config is in `full_config.yaml`; every run's own config, losses "
              "(jsonl/csv), loss plot, model and MMEB summaries are under `runs/<row>/seed<N>/`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _start(settings: DemoSettings) -> str:
    """What every row fine-tunes, in words (the from-scratch row says so in its own label)."""
    if settings.backbone == "tiny":
        return "tiny random Qwen2-VL (1.1M parameters, trained from scratch)"
    if settings.backbone == "tiny-pretrained":
        return ("the shipped tiny Qwen2-VL pretrained generatively on held-out shapes scenes (`tiny-pretrained`, "
                "docs/pretraining.md), fine-tuned by every row with its vision tower frozen (as the paper's LoRA "
                "on the language model leaves it)"
                + ("; the from-scratch row starts from a random backbone instead" if settings.from_scratch else ""))
    return f"backbone `{settings.backbone}`, fine-tuned by every row"


def terminal_table(records, settings: DemoSettings) -> str:
    rows = settings.selected_rows()
    return text_table(["row", *(SHORT[c] for c in COLUMNS)], table(records, rows, "hit@1"))


def _machine() -> str:
    import os
    import platform

    return f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}"
