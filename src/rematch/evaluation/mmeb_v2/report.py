"""The MMEB-V2 summary in the official report's layout: Image / Video / VisDoc and All.

Every task contributes one score, its modality's metric (hit@1 for image and video tasks,
NDCG@5 for documents). Each column of the official table is an UNWEIGHTED mean of task
scores: per category (Image CLS/QA/RET/GD, Video CLS/QA/RET/MRET, VisDoc
VDRv1/VDRv2/VR/OOD), per modality ("Overall" of a modality = the mean over all its
tasks, not over its category means), and "All" = the mean over every evaluated task.

Only benchmark tasks enter those means. Tasks of one's own (``official: false``) are
listed per task and averaged in a separate ``custom`` group, unless no benchmark task was
evaluated at all, in which case the table is computed over them and
``summary["scope"]`` says so. ``summary["coverage"]`` says which of the 78 tasks were
evaluated: only with all of them is "All" the MMEB-V2 overall score.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from rematch.atomic import write_json_atomically, write_text_atomically
from rematch.evaluation.mmeb_v2.tasks import CATEGORIES, MODALITIES, OFFICIAL_TASKS, PRIMARY_METRIC

SCOPE_OFFICIAL = "MMEB-V2 tasks"
SCOPE_CUSTOM = "tasks of one's own (no MMEB-V2 task was evaluated)"
_TITLES = {"image": "Image", "video": "Video", "visdoc": "VisDoc"}


def _mean(results: Mapping[str, Mapping], names) -> float:
    return round(float(np.mean([results[name]["score"] for name in names])), 6)


def modality_table(results: Mapping[str, Mapping]) -> dict:
    """``{modality: {"metric", "score", "tasks", "categories": {category: {"score", "tasks"}}}}``."""
    table = {}
    for modality in MODALITIES:
        members = sorted(name for name, result in results.items() if result["modality"] == modality)
        if not members:
            continue
        categories = {}
        for category in CATEGORIES[modality]:
            names = [name for name in members if results[name]["category"] == category]
            if names:
                categories[category] = {"score": _mean(results, names), "tasks": names}
        table[modality] = {"metric": PRIMARY_METRIC[modality], "score": _mean(results, members), "tasks": members,
                           "categories": categories}
    return table


def summarize_v2(results: Mapping[str, dict], *, fingerprint: str | None = None, throughput: Mapping | None = None,
                 input_limits: Mapping | None = None, tie_rule: str | None = None,
                 video_sampling: Mapping | None = None) -> dict:
    """The content of summary.json (see the module docstring)."""
    if not results:
        raise ValueError("no task results to summarise")
    official = {name: result for name, result in results.items() if result.get("official", True)}
    custom = {name: result for name, result in results.items() if not result.get("official", True)}
    scope = official or custom
    coverage = {}
    for modality in MODALITIES:
        names = [name for name, spec in OFFICIAL_TASKS.items() if spec.modality == modality]
        missing = [name for name in names if name not in official]
        coverage[modality] = {"evaluated": len(names) - len(missing), "of": len(names), "missing": missing}
    return {
        "benchmark": "MMEB-V2",
        "primary_metrics": dict(PRIMARY_METRIC),
        "scope": SCOPE_OFFICIAL if official else SCOPE_CUSTOM,
        "all": {"score": _mean(scope, scope), "tasks": len(scope)},
        "modalities": modality_table(scope),
        "custom": ({"score": _mean(custom, custom), "tasks": sorted(custom), "modalities": modality_table(custom)}
                   if custom and official else None),
        "coverage": {"complete": all(not c["missing"] for c in coverage.values()),
                     "evaluated": sum(c["evaluated"] for c in coverage.values()), "of": len(OFFICIAL_TASKS),
                     **coverage},
        "tasks": dict(results),
        "tie_rule": tie_rule,
        "input_limits": dict(input_limits) if input_limits is not None else None,
        "video_sampling": dict(video_sampling) if video_sampling is not None else None,
        "model_fingerprint": fingerprint,
        "throughput": dict(throughput or {}),
        "scores_are": "fractions in [0, 1]; every group score is an unweighted mean over tasks",
    }


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def official_layout_row(summary: Mapping) -> tuple[list[str], list[str]]:
    """(header, cells) of the official table: per modality its categories and Overall, then All."""
    header, cells = [], []
    for modality in MODALITIES:
        row = summary["modalities"].get(modality)
        for category in CATEGORIES[modality]:
            header.append(f"{_TITLES[modality]} {category}")
            cells.append(_pct(row["categories"][category]["score"]) if row and category in row["categories"] else "—")
        header.append(f"{_TITLES[modality]} Overall")
        cells.append(_pct(row["score"]) if row else "—")
    header.append("All")
    cells.append(_pct(summary["all"]["score"]))
    return header, cells


def render_markdown_v2(summary: Mapping) -> str:
    """summary.md: the official-layout table, the per-task tables, coverage and throughput."""
    lines = ["# MMEB-V2 evaluation", ""]
    if summary.get("model_fingerprint"):
        lines += [f"Model fingerprint: `{summary['model_fingerprint']}`", ""]
    lines += ["Scores in %. Image and video tasks: hit@1; visual documents: NDCG@5 (linear gains, graded where the "
              "qrels grade). Every column is an unweighted mean over tasks; each modality's Overall is the mean over "
              "its tasks and All the mean over every task.", ""]
    coverage = summary["coverage"]
    if summary["scope"] == SCOPE_CUSTOM:
        lines += ["Note: no MMEB-V2 task was evaluated; the table is over the tasks of one's own.", ""]
    elif not coverage["complete"]:
        parts = ", ".join(f"{_TITLES[m]} {coverage[m]['evaluated']}/{coverage[m]['of']}" for m in MODALITIES)
        lines += [f"Note: {coverage['evaluated']} of {coverage['of']} MMEB-V2 tasks were evaluated ({parts}), so "
                  "'All' is not the MMEB-V2 overall score.", ""]
    sampling = summary.get("video_sampling")
    if sampling and "video" in summary["modalities"] and not sampling.get("matches_official"):
        how = (f"{sampling['frames']} frames by the harness's rule" if sampling["rule"] == "mmeb_v2" else
               f"the model's own sampling ({sampling.get('fps')} fps, at most {sampling['frames']} frames)")
        lines += [f"Note: videos were encoded with {how}, not the official 8 frames, so the video scores are not "
                  "comparable with the leaderboard.", ""]
    header, cells = official_layout_row(summary)
    lines += ["## Summary", "", "| " + " | ".join(header) + " |", "|" + "---:|" * len(header),
              "| " + " | ".join(cells) + " |", ""]
    custom = summary.get("custom")
    if custom:
        lines += [f"Tasks of one's own (outside the means above): {', '.join(custom['tasks'])}; their mean "
                  f"{_pct(custom['score'])}.", ""]
    tasks = summary["tasks"]
    for modality in MODALITIES:
        names = [n for n in tasks if tasks[n]["modality"] == modality]
        if not names:
            continue
        lines += [f"## {_TITLES[modality]} tasks", "",
                  "| task | category | queries | score | hit@1 | hit@1_strict | ndcg@5 | mrr |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        order = {category: index for index, category in enumerate(CATEGORIES[modality])}
        for name in sorted(names, key=lambda n: (order.get(tasks[n]["category"], 99), n)):
            result = tasks[name]
            label = name if result.get("official", True) else f"{name} (own)"
            mrr = result.get("mrr")
            lines.append(f"| {label} | {result['category']} | {result['count']} | {_pct(result['score'])} | "
                         f"{_pct(result.get('hit@1'))} | {_pct(result.get('hit@1_strict'))} | "
                         f"{_pct(result.get('ndcg@5'))} | {'—' if mrr is None else f'{mrr:.4f}'} |")
        lines.append("")
    skipped = {n: r["skipped_rows"] for n, r in tasks.items() if r.get("skipped_rows")}
    if skipped:
        lines += ["Rows skipped as bad (--skip-bad; such a run is not comparable with the leaderboard): "
                  + ", ".join(f"{n} {c}" for n, c in skipped.items()), ""]
    throughput = summary.get("throughput") or {}
    if throughput:
        lines += [f"Encoding: {throughput.get('items_encoded', 0)} items in "
                  f"{throughput.get('encode_seconds', 0):.1f} s ({throughput.get('items_per_second', 0):.1f} items/s); "
                  f"{throughput.get('items_from_cache', 0)} from the embedding cache.", ""]
    return "\n".join(lines)


def write_summary_v2(summary: Mapping, out_dir: str | os.PathLike) -> None:
    """summary.json and summary.md under ``out_dir``, each written atomically."""
    out = Path(out_dir)
    write_json_atomically(out / "summary.json", summary)
    write_text_atomically(out / "summary.md", render_markdown_v2(summary))


__all__ = ["SCOPE_CUSTOM", "SCOPE_OFFICIAL", "modality_table", "official_layout_row", "render_markdown_v2",
           "summarize_v2", "write_summary_v2"]
