"""Aggregate per-subset MMEB results and write them as summary.json, summary.md and summary.png.

Aggregation follows MMEB: every group score is the UNWEIGHTED mean over its subsets
(a 1000-query subset and a 100-query subset weigh the same).

* per meta-task (classification, vqa, retrieval, grounding): the subsets of that task;
* IND / OOD: the subsets in / out of MMEB-train (``rematch.data.mmeb_subsets``);
* overall: every subset with a known meta-task.

Subsets this project does not know (``subset_info`` says meta-task "other") are
reported per subset and as their own "other" group, but are left out of the meta-task,
IND/OOD and overall means, so adding a custom task never shifts the MMEB numbers.
Subsets registered with a meta-task (``register_subset``, e.g. the built-in shapes
tasks) count in that meta-task and in overall, and in IND/OOD only if registered so. ``summary["mmeb"]`` says whether
all 36 MMEB subsets were evaluated: only then is "overall" the MMEB overall score.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from rematch.data.mmeb_subsets import META_TASKS, MMEB_SUBSETS, OTHER, subset_info
from rematch.atomic import write_bytes_atomically, write_json_atomically, write_text_atomically

_METRIC = re.compile(r"^(hit|recall|ndcg)@\d+$|^mrr$")
SPLITS = ("IND", "OOD")
GROUP_ORDER = (*META_TASKS, *SPLITS, "overall", OTHER)


def metric_names(results: Mapping[str, Mapping]) -> list[str]:
    """Metric keys present in every subset result, in a stable order (hit@k, recall@k, ndcg@k, mrr)."""
    common = set.intersection(*(set(k for k in result if _METRIC.match(k)) for result in results.values()))

    def order(name: str) -> tuple:
        kind, _, k = name.partition("@")
        return (["hit", "recall", "ndcg", "mrr"].index(kind), int(k or 0))

    return sorted(common, key=order)


def aggregate(results: Mapping[str, Mapping]) -> dict[str, dict]:
    """Group means (see module docstring): ``{group: {"subsets": [...], metric: mean, ...}}``.

    Groups without subsets are left out.
    """
    if not results:
        raise ValueError("no subset results to aggregate")
    metrics = metric_names(results)
    members: dict[str, list[str]] = {group: [] for group in GROUP_ORDER}
    for name, result in results.items():
        info = subset_info(name)
        meta_task = result.get("meta_task", info.meta_task)
        split = result.get("split", info.split)
        members.setdefault(meta_task, []).append(name)
        if meta_task == OTHER:
            continue
        if split in SPLITS:
            members[split].append(name)
        members["overall"].append(name)
    groups = {}
    for group, names in members.items():
        if names:
            groups[group] = {"subsets": sorted(names),
                             **{m: round(float(np.mean([results[n][m] for n in names])), 6) for m in metrics}}
    return groups


def summarize(results: Mapping[str, dict], fingerprint: str | None = None, throughput: Mapping | None = None,
              primary: str = "hit@1") -> dict:
    """The content of summary.json."""
    missing = [name for name in MMEB_SUBSETS if name not in results]
    return {
        "primary_metric": primary,
        "metrics": metric_names(results),
        "model_fingerprint": fingerprint,
        "groups": aggregate(results),
        "subsets": dict(results),
        "mmeb": {"complete": not missing, "evaluated": len(MMEB_SUBSETS) - len(missing), "missing": missing},
        "throughput": dict(throughput or {}),
        "scores_are": "fractions in [0, 1]; group scores are unweighted means over subsets",
    }


def write_summary(summary: Mapping, out_dir: str | os.PathLike, plot: bool = True) -> None:
    """summary.json, summary.md and (if ``plot``) summary.png under ``out_dir``, each written atomically."""
    out = Path(out_dir)
    write_json_atomically(out / "summary.json", summary)
    write_text_atomically(out / "summary.md", render_markdown(summary))
    if plot:
        write_bytes_atomically(out / "summary.png", render_plot(summary))


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def render_markdown(summary: Mapping) -> str:
    """A human-readable report: group table, per-subset table, coverage and throughput."""
    metrics = summary["metrics"]
    primary = summary["primary_metric"]
    lines = ["# MMEB evaluation", ""]
    if summary.get("model_fingerprint"):
        lines += [f"Model fingerprint: `{summary['model_fingerprint']}`", ""]
    lines += [f"Scores in %, except MRR (a fraction). Primary metric: {primary} (MMEB's Precision@1). "
              "Group scores are unweighted means over their subsets.", ""]
    coverage = summary["mmeb"]
    if not coverage["complete"]:
        lines += [f"Note: {coverage['evaluated']} of {len(MMEB_SUBSETS)} MMEB subsets were evaluated, so "
                  "'overall' is not the MMEB overall score.", ""]
    header = "| {} | subsets | " + " | ".join(metrics) + " |"
    lines += ["## Summary", "", header.format("group"), "|---|---:|" + "---:|" * len(metrics)]
    for group in GROUP_ORDER:
        if group in summary["groups"]:
            row = summary["groups"][group]
            cells = [_fmt(m, row[m]) for m in metrics]
            lines.append(f"| {group} | {len(row['subsets'])} | " + " | ".join(cells) + " |")
    lines += ["", "## Per subset", "",
              "| subset | meta-task | split | queries | " + " | ".join(metrics) + " |",
              "|---|---|---|---:|" + "---:|" * len(metrics)]
    for name in _plot_order(summary["subsets"]):
        result = summary["subsets"][name]
        cells = [_fmt(m, result[m]) for m in metrics]
        lines.append(f"| {name} | {result['meta_task']} | {result['split']} | {result['count']} | "
                     + " | ".join(cells) + " |")
    duplicates = {n: r.get("positive_duplicates", 0) for n, r in summary["subsets"].items()}
    if any(duplicates.values()):
        lines += ["", "Queries whose candidate list repeats the correct item (an exact tie, counted as a miss): "
                  + ", ".join(f"{n} {c}" for n, c in duplicates.items() if c)]
    throughput = summary.get("throughput") or {}
    if throughput:
        lines += ["", f"Encoding: {throughput.get('items_encoded', 0)} items in "
                  f"{throughput.get('encode_seconds', 0):.1f} s ({throughput.get('items_per_second', 0):.1f} items/s); "
                  f"{throughput.get('items_from_cache', 0)} from the embedding cache."]
    return "\n".join(lines) + "\n"


def _fmt(metric: str, value: float) -> str:
    return f"{value:.4f}" if metric == "mrr" else _pct(value)


def _plot_order(results: Mapping[str, Mapping]) -> list[str]:
    tasks = list(META_TASKS) + [OTHER]

    def key(name: str) -> tuple:
        meta = results[name].get("meta_task", OTHER)
        return (tasks.index(meta) if meta in tasks else len(tasks), results[name].get("split", ""), name)

    return sorted(results, key=key)


def render_plot(summary: Mapping) -> bytes:
    """PNG bar chart of the primary metric per subset, coloured by meta-task, with group means."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    primary = summary["primary_metric"]
    names = _plot_order(summary["subsets"])
    values = [100 * summary["subsets"][n][primary] for n in names]
    tasks = [summary["subsets"][n].get("meta_task", OTHER) for n in names]
    palette = dict(zip([*META_TASKS, OTHER], ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8C8C8C"]))
    figure, axes = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2.0), 4.5))
    axes.bar(range(len(names)), values, color=[palette.get(t, "#8C8C8C") for t in tasks])
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    axes.set_ylabel(f"{primary} (%)")
    axes.set_ylim(0, 100)
    for position, value in enumerate(values):
        axes.text(position, value + 1, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
    handles = [Patch(color=palette.get(task, "#8C8C8C"), label=task) for task in dict.fromkeys(tasks)]
    overall = summary["groups"].get("overall")
    if overall:
        handles.append(axes.axhline(100 * overall[primary], color="black", linestyle="--", linewidth=1,
                                    label=f"overall {100 * overall[primary]:.1f}"))
    axes.legend(handles=handles, fontsize=8, loc="upper right")
    axes.set_title("MMEB per-subset scores")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def load_summary(run_dir: str | os.PathLike) -> dict:
    """summary.json of an evaluation output directory (an error names the path if absent)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no summary.json (is {run_dir} an `rematch eval mmeb` output directory?)")
    return json.loads(path.read_text(encoding="utf-8"))


def compare_summaries(baseline: Mapping, candidate: Mapping, metric: str | None = None,
                      names: tuple[str, str] = ("baseline", "candidate")) -> str:
    """A side-by-side table of two runs with delta = candidate - baseline, groups first, then subsets."""
    metric = metric or candidate.get("primary_metric", "hit@1")
    scale, digits = (1.0, 4) if metric == "mrr" else (100.0, 2)
    rows: list[tuple[str, float | None, float | None]] = []
    for group in GROUP_ORDER:
        a, b = baseline["groups"].get(group), candidate["groups"].get(group)
        if a or b:
            rows.append((f"[{group}]", a and a.get(metric), b and b.get(metric)))
    subsets = {**baseline["subsets"], **candidate["subsets"]}
    for name in _plot_order(subsets):
        a, b = baseline["subsets"].get(name), candidate["subsets"].get(name)
        rows.append((name, a and a.get(metric), b and b.get(metric)))
    width = max(len(r[0]) for r in rows + [("subset", 0, 0)])
    unit = "" if metric == "mrr" else " (%)"
    lines = [f"{metric}{unit}: {names[0]} vs {names[1]}",
             f"{'subset':<{width}}  {'baseline':>9}  {'candidate':>9}  {'delta':>8}"]
    for label, a, b in rows:
        cell_a = f"{scale * a:9.{digits}f}" if a is not None else f"{'—':>9}"
        cell_b = f"{scale * b:9.{digits}f}" if b is not None else f"{'—':>9}"
        delta = f"{scale * (b - a):+8.{digits}f}" if a is not None and b is not None else f"{'':>8}"
        lines.append(f"{label:<{width}}  {cell_a}  {cell_b}  {delta}")
    return "\n".join(lines)
