"""Aggregate per-subset MMEB results and write them as summary.json, summary.md and summary.png.

Aggregation follows MMEB: every group score is the UNWEIGHTED mean over its subsets
(a 1000-query subset and a 100-query subset weigh the same).

* per meta-task (classification, vqa, retrieval, grounding): the subsets of that task;
* IND / OOD: the subsets in / out of MMEB-train (``rematch.data.mmeb_subsets``);
* overall: every subset with a known meta-task, or, when no evaluated subset has one,
  every evaluated subset (so every summary has an overall; ``summary["overall_scope"]``
  says which of the two it is).

Subsets this project does not know (``subset_info`` says meta-task "other") are
reported per subset and as their own "other" group, but are left out of the meta-task,
IND/OOD and overall means whenever a known subset is present, so adding a custom task
never shifts the MMEB numbers. Subsets registered with a meta-task (a data root's manifest,
e.g. the built-in shapes tasks) count in that meta-task and in overall, and in IND/OOD
only if registered so. ``summary["mmeb"]`` says whether all 36 MMEB subsets were
evaluated: only then is "overall" the MMEB overall score.

Metrics: ``hit@1`` follows the official MMEB tie rule, ``hit@1_strict`` the pessimistic
one (see :mod:`rematch.evaluation.mmeb`); both are averaged the same way.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rematch.data.mmeb_subsets import META_TASKS, MMEB_SUBSETS, OTHER, subset_info
from rematch.hub.card import EvalSummaryError, EvalTable
from rematch.atomic import write_bytes_atomically, write_json_atomically, write_text_atomically

_METRIC = re.compile(r"^(hit|recall|ndcg)@\d+(_strict)?$|^mrr$")
SPLITS = ("IND", "OOD")
GROUP_ORDER = (*META_TASKS, *SPLITS, "overall", OTHER)
STRICT_SUFFIX = "_strict"

#: ``summary["overall_scope"]``: what the overall mean is taken over.
OVERALL_KNOWN = "subsets with a known meta-task"
OVERALL_ALL = "every evaluated subset (none has a known meta-task)"


def metric_names(results: Mapping[str, Mapping]) -> list[str]:
    """Metric keys present in every subset result, in a stable order (hit@k, recall@k, ndcg@k, mrr)."""
    common = set.intersection(*(set(k for k in result if _METRIC.match(k)) for result in results.values()))

    def order(name: str) -> tuple:
        kind, _, k = name.partition("@")
        k, strict, _ = k.partition(STRICT_SUFFIX)
        return (["hit", "recall", "ndcg", "mrr"].index(kind), int(k or 0), bool(strict))

    return sorted(common, key=order)


def _meta_task_and_split(name: str, result: Mapping) -> tuple[str, str]:
    """A result's own meta-task and split, else the registry's (results written by other tools may lack them)."""
    info = subset_info(name)
    return result.get("meta_task", info.meta_task), result.get("split", info.split)


def aggregate(results: Mapping[str, Mapping]) -> dict[str, dict]:
    """Group means (see module docstring): ``{group: {"subsets": [...], metric: mean, ...}}``.

    Groups without subsets are left out, except "overall", which always exists.
    """
    if not results:
        raise ValueError("no subset results to aggregate")
    metrics = metric_names(results)
    members: dict[str, list[str]] = {group: [] for group in GROUP_ORDER}
    for name, result in results.items():
        meta_task, split = _meta_task_and_split(name, result)
        members.setdefault(meta_task, []).append(name)
        if meta_task == OTHER:
            continue
        if split in SPLITS:
            members[split].append(name)
        members["overall"].append(name)
    if not members["overall"]:  # only custom tasks: their plain mean is still a useful single number
        members["overall"] = list(results)
    groups = {}
    for group, names in members.items():
        if names:
            groups[group] = {"subsets": sorted(names),
                             **{m: round(float(np.mean([results[n][m] for n in names])), 6) for m in metrics}}
    return groups


def summarize(results: Mapping[str, dict], fingerprint: str | None = None, throughput: Mapping | None = None,
              primary: str = "hit@1", input_limits: Mapping | None = None, tie_rule: str | None = None) -> dict:
    """The content of summary.json (``input_limits`` and ``tie_rule`` as :mod:`rematch.evaluation.mmeb` records them)."""
    missing = [name for name in MMEB_SUBSETS if name not in results]
    groups = aggregate(results)
    known = any(_meta_task_and_split(name, result)[0] != OTHER for name, result in results.items())
    return {
        "primary_metric": primary,
        "metrics": metric_names(results),
        "tie_rule": tie_rule,
        "input_limits": dict(input_limits) if input_limits is not None else None,
        "model_fingerprint": fingerprint,
        "overall_scope": OVERALL_KNOWN if known else OVERALL_ALL,
        "groups": groups,
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
    if summary.get("tie_rule") == "official":
        lines += ["Ties: hit@1, hit@5 and MRR follow the official MMEB rule (argmax, so an exact tie with the "
                  "correct candidate 0 is a hit); hit@1_strict counts such a tie as a miss.", ""]
    limits = summary.get("input_limits")
    if limits:
        cut = limits["max_text_tokens"]
        text = f"text cut at {cut} tokens" if cut else "no text truncation"
        verdict = "the official MMEB-V1 Qwen2-VL values" if limits["matches_official"] else \
            "NOT the official MMEB-V1 values, so scores are not comparable with the leaderboard"
        lines += [f"Input limits ({limits['preset']}): images {limits['min_pixels']}-{limits['max_pixels']} pixels, "
                  f"{text}: {verdict}.", ""]
    coverage = summary["mmeb"]
    if not coverage["complete"]:
        lines += [f"Note: {coverage['evaluated']} of {len(MMEB_SUBSETS)} MMEB subsets were evaluated, so "
                  "'overall' is not the MMEB overall score.", ""]
    if summary.get("overall_scope") == OVERALL_ALL:
        lines += ["Note: no evaluated subset has a known meta-task, so 'overall' is the mean over all of them.", ""]
    header = "| {} | subsets | " + " | ".join(metrics) + " |"
    lines += ["## Summary", "", header.format("group"), "|---|---:|" + "---:|" * len(metrics)]
    for group in GROUP_ORDER:
        if group in summary["groups"]:
            row = summary["groups"][group]
            cells = [_fmt(m, row[m]) for m in metrics]
            lines.append(f"| {group} | {len(row['subsets'])} | " + " | ".join(cells) + " |")
    reranked = any(result.get("rerank") for result in summary["subsets"].values())
    extra = ["rerank AUC"] if reranked else []
    lines += ["", "## Per subset", "",
              "| subset | meta-task | split | queries | " + " | ".join([*metrics, *extra]) + " |",
              "|---|---|---|---:|" + "---:|" * (len(metrics) + len(extra))]
    for name in _plot_order(summary["subsets"]):
        result = summary["subsets"][name]
        cells = [_fmt(m, result[m]) for m in metrics]
        if reranked:
            auc = result.get("rerank_auc")
            cells.append("—" if auc is None else f"{auc:.3f}")
        lines.append(f"| {name} | {result['meta_task']} | {result['split']} | {result['count']} | "
                     + " | ".join(cells) + " |")
    if reranked:
        top = sorted({result["rerank"] for result in summary["subsets"].values() if result.get("rerank")})
        lines += ["", f"Reranked: each query's top {', '.join(map(str, top))} reordered by the matching head's "
                  "p(Yes); the scores above are after reranking. rerank AUC: how often the head gives a query's "
                  "positive a higher p(Yes) than a negative it reranked (pooled over the subset's queries, ties "
                  "half): 0.5 is a head at chance, 1.0 a perfect separation."]
    duplicates = {n: r.get("positive_duplicates", 0) for n, r in summary["subsets"].items()}
    if any(duplicates.values()):
        lines += ["", "Queries whose candidate list repeats the correct item (exact ties): "
                  + ", ".join(f"{n} {c}" for n, c in duplicates.items() if c)]
    ties = {n: r.get("ties_at_top", 0) for n, r in summary["subsets"].items()}
    if any(ties.values()):
        lines += ["", "Queries where the correct item ties for the top score (hit under the official rule, miss "
                  "under the strict one): " + ", ".join(f"{n} {c}" for n, c in ties.items() if c)]
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


#: ``summary["tie_rule"]`` of a run written before hit@1 followed the official rule.
LEGACY_TIE_RULE = "legacy (strict)"


def load_summary(run_dir: str | os.PathLike) -> dict:
    """summary.json of an evaluation output directory (an error names the path if absent).

    A summary written before hit@1 followed the official tie rule (it has no ``tie_rule``)
    counted exact ties as misses: its ``hit@1`` is renamed ``hit@1_strict`` on loading and
    ``tie_rule`` is set to :data:`LEGACY_TIE_RULE`, so comparing it with a new run puts
    like next to like instead of showing the rule change as an improvement.
    """
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no summary.json (is {run_dir} an `rematch eval mmeb` output directory?)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    _check_summary_shape(summary, path)
    if "tie_rule" not in summary:  # every summary written since the rule change has the key
        summary["tie_rule"] = LEGACY_TIE_RULE
        for table in (summary.get("subsets", {}), summary.get("groups", {})):
            for row in table.values():
                if "hit@1" in row and "hit@1" + STRICT_SUFFIX not in row:
                    row["hit@1" + STRICT_SUFFIX] = row.pop("hit@1")
    return summary


def _check_summary_shape(summary: Any, path: Path) -> None:
    """What comparing and the card read from a summary: 'subsets' and 'groups' objects of
    per-row objects whose metrics are numbers (an MMEB-V2 summary, or any other JSON, failed with
    a KeyError deep in the comparison)."""
    expected = "expected a JSON object with 'subsets' and 'groups' objects of per-subset results"
    if not isinstance(summary, dict) or not isinstance(summary.get("subsets"), dict) \
            or not isinstance(summary.get("groups"), dict):
        kind = " (an `rematch eval mmeb-v2` summary?)" if isinstance(summary, dict) and "modalities" in summary else ""
        raise ValueError(f"{path}: not an `rematch eval mmeb` summary{kind}; {expected}")
    primary = summary.get("primary_metric", "hit@1")
    if not isinstance(primary, str):
        raise ValueError(f"{path}: field 'primary_metric' must be a string, got {primary!r}")
    for table in ("groups", "subsets"):
        for name, row in summary[table].items():
            if not isinstance(row, dict):
                raise ValueError(f"{path}: {table} entry {name!r} is not an object; {expected}")
            for key, value in row.items():
                metric = key.startswith(("hit@", "recall@", "ndcg@")) or key in ("mrr", "score")
                if metric and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                     or not math.isfinite(value)):
                    raise ValueError(f"{path}: {table} entry {name!r}: {key} must be a number, got {value!r}")
            if table == "groups" and not isinstance(row.get("subsets", []), list):
                raise ValueError(f"{path}: groups entry {name!r}: 'subsets' must be a list")


def settings_line(limits: Mapping | None, rerank: int, target_prompt_style: str | None) -> str:
    """One console line of what an evaluation runs with: its numbers depend on each of these
    (the demo's models score 50% vs 0% on grounding depending on the input limits alone)."""
    parts = []
    if limits:
        cut = limits["max_text_tokens"]
        official = "official MMEB-V1" if limits["matches_official"] else "NOT the official MMEB-V1 values"
        parts.append(f"input limits {limits['preset']}: images {limits['min_pixels']}-{limits['max_pixels']} px, "
                     f"{f'text cut at {cut} tokens' if cut else 'no text truncation'} ({official})")
    parts.append(f"reranked: top {rerank} by the matching head's p(Yes)" if rerank else "not reranked")
    if target_prompt_style:
        parts.append(f"target prompts: {target_prompt_style}")
    return "evaluating with " + "; ".join(parts)


def read_eval_table(eval_dir: str | os.PathLike, fingerprint: str | None = None) -> EvalTable:
    """The card's evaluation table from an ``rematch eval mmeb`` output directory.

    The summary records the fingerprint of the model it scored; with ``fingerprint`` given, a
    different one is refused (and the table keeps it, so a later check can refuse too), so a
    card never shows another model's numbers. A damaged summary is an :class:`EvalSummaryError`
    naming the file.
    """
    path = Path(eval_dir) / "summary.json"
    try:
        summary = load_summary(eval_dir)
    except (OSError, ValueError) as error:
        raise EvalSummaryError(str(error)) from None
    for name, row in {**summary["groups"], **summary["subsets"]}.items():
        if not isinstance(row, Mapping):
            raise EvalSummaryError(f"{path}: entry {name!r} is not an object")
    primary = summary.get("primary_metric", "hit@1")
    notes = []
    coverage = summary.get("mmeb") or {}
    if coverage and not coverage.get("complete"):
        notes.append(f"Only {coverage.get('evaluated')} of the 36 MMEB subsets were evaluated, so 'overall' is not "
                     "the MMEB overall score.")
    limits = summary.get("input_limits") or {}
    if limits and not limits.get("matches_official", True):
        notes.append("The input limits were not the official MMEB-V1 ones: not comparable with the leaderboard.")
    groups = summary["groups"]
    table = EvalTable(
        primary_metric=primary, notes=tuple(notes),
        groups=tuple((group, len(groups[group].get("subsets", [])), groups[group][primary])
                     for group in GROUP_ORDER if group in groups and primary in groups[group]),
        subsets=tuple((name, row[primary]) for name, row in sorted(summary["subsets"].items()) if primary in row),
        model_fingerprint=summary.get("model_fingerprint"), source=str(path))
    return table.check_model(fingerprint)


def compare_summaries(baseline: Mapping, candidate: Mapping, metric: str | None = None,
                      names: tuple[str, str] = ("baseline", "candidate")) -> str:
    """A side-by-side table of two runs with delta = candidate - baseline, groups first, then subsets.

    For hit@k the strict-tie variant (``hit@k_strict``) gets its own three columns when
    either run has it. Notes under the table say when the runs used different input
    limits or a run predates the official tie rule, since then a delta is not a model change.
    """
    metric = metric or candidate.get("primary_metric", "hit@1")
    strict = metric + STRICT_SUFFIX
    pairs = [metric] + ([strict] if _has_metric(baseline, strict) or _has_metric(candidate, strict) else [])
    scale, digits = (1.0, 4) if metric == "mrr" else (100.0, 2)
    rows: list[tuple[str, Mapping | None, Mapping | None]] = []
    for group in GROUP_ORDER:
        a, b = baseline["groups"].get(group), candidate["groups"].get(group)
        if a or b:
            rows.append((f"[{group}]", a, b))
    subsets = {**baseline["subsets"], **candidate["subsets"]}
    for name in _plot_order(subsets):
        rows.append((name, baseline["subsets"].get(name), candidate["subsets"].get(name)))
    width = max(len(r[0]) for r in rows + [("subset", None, None)])
    unit = "" if metric == "mrr" else " (%)"
    title = f"{metric}{unit}: {names[0]} vs {names[1]}"
    header = f"{'subset':<{width}}  {'baseline':>9}  {'candidate':>9}  {'delta':>8}"
    if len(pairs) > 1:
        title += f"; then {strict} (exact ties count as misses)"
        header += f"  {'strict b.':>9}  {'strict c.':>9}  {'delta':>8}"
    lines = [title, header]
    for label, a, b in rows:
        cells = []
        for name in pairs:
            value_a, value_b = a and a.get(name), b and b.get(name)
            cells.append(f"{scale * value_a:9.{digits}f}" if value_a is not None else f"{'—':>9}")
            cells.append(f"{scale * value_b:9.{digits}f}" if value_b is not None else f"{'—':>9}")
            cells.append(f"{scale * (value_b - value_a):+8.{digits}f}" if value_a is not None and value_b is not None
                         else f"{'':>8}")
        lines.append(f"{label:<{width}}  " + "  ".join(cells).rstrip())
    return "\n".join(lines + _comparison_notes(baseline, candidate, names))


def _has_metric(summary: Mapping, metric: str) -> bool:
    return any(metric in row for row in summary.get("subsets", {}).values())


def _comparison_notes(baseline: Mapping, candidate: Mapping, names: tuple[str, str]) -> list[str]:
    """Warnings about differences in protocol between two runs (a delta would not be the model's)."""
    notes = []
    for summary, name in ((baseline, names[0]), (candidate, names[1])):
        if summary.get("tie_rule") == LEGACY_TIE_RULE:
            notes.append(f"note: {name} predates the official tie rule: its hit@1 is shown as hit@1_strict, "
                         "and its hit@5 and mrr count exact ties as misses")
    limits = [summary.get("input_limits") for summary in (baseline, candidate)]
    if limits[0] != limits[1]:
        def describe(value):
            if not value:
                return "not recorded"
            return (f"{value['min_pixels']}-{value['max_pixels']} px, "
                    f"{value['max_text_tokens'] or 'no'} text-token limit")
        notes.append(f"note: the runs used different input limits ({names[0]}: {describe(limits[0])}; "
                     f"{names[1]}: {describe(limits[1])})")
    return notes
