"""``rematch eval mteb``: run mteb tasks on a ReMatch model and write mteb's results plus a summary.

Why a command: mteb is how embedding models are compared, and a ReMatch model needs the
wrapper of :mod:`rematch.integrations.mteb` to be run there at all (image tasks included).
Tasks are named as mteb names them; mteb's own offline mock tasks (``MockRetrievalTask``,
``MockAny2AnyRetrievalT2I``, ... from ``mteb.mocks``) are accepted too, as a smoke test
that needs no download.

``OUT`` follows the output rule (:mod:`rematch.outputs`): new, empty, or an earlier
``eval mteb`` output. mteb files its results as ``OUT/results/<model>/<fingerprint>/<task>.json``;
a rerun reuses the tasks already there (``--overwrite`` runs them again). ``OUT/summary.json``
and ``OUT/summary.md`` give each task's main score.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

from rematch.atomic import write_json_atomically
from rematch.integrations.mteb import ReMatchEncoder
from rematch.outputs import claim_outputs

COMMAND = "eval mteb"
RESULTS_DIR, SUMMARY_JSON, SUMMARY_MD = "results", "summary.json", "summary.md"


class UnknownTaskError(ValueError):
    """A task name that neither mteb's registry nor its mock tasks know."""


def resolve_tasks(names: Sequence[str]) -> list:
    """mteb task objects for ``names``: registry tasks, or mteb's offline mock tasks by their names."""
    import mteb
    from mteb.mocks import ALL_MOCK_TASK_REGISTRY

    tasks = []
    for name in names:
        if name in ALL_MOCK_TASK_REGISTRY:
            tasks.append(ALL_MOCK_TASK_REGISTRY[name]())
            continue
        try:
            tasks.append(mteb.get_task(name))
        except KeyError as error:
            message = str(error.args[0]) if error.args else name
            raise UnknownTaskError(f"mteb has no task {name!r} ({message.strip(chr(39))})") from None
    return tasks


def run_mteb(encoder: ReMatchEncoder, task_names: Sequence[str], out_dir: str | os.PathLike, *,
             overwrite: bool = False, show_progress: bool = False,
             log: Callable[[str], None] | None = print) -> dict:
    """Run the tasks with ``encoder``; write mteb's results and the summary under ``out_dir``; return it."""
    import mteb

    say = log or (lambda _: None)
    tasks = resolve_tasks(task_names)  # an unknown name fails before anything is written
    out = Path(out_dir)
    outputs = claim_outputs(out, COMMAND, [RESULTS_DIR, SUMMARY_JSON, SUMMARY_MD])
    with _datasets_bars(show_progress):  # mteb's dataset preparation draws a bar per split otherwise
        result = mteb.evaluate(encoder, tasks, cache=mteb.ResultCache(out),  # files under OUT/results/
                               overwrite_strategy="always" if overwrite else "only-missing",
                               show_progress_bar=show_progress, co2_tracker=False,
                               encode_kwargs={"batch_size": encoder.batch_size, "show_progress_bar": show_progress})
    meta = encoder.mteb_model_meta
    summary = {"model": meta.name, "model_fingerprint": meta.revision, "tasks": {}}
    by_name = {task.metadata.name: task for task in tasks}
    for task_result in result.task_results:
        task = by_name[task_result.task_name]
        summary["tasks"][task_result.task_name] = {
            "main_score": round(float(task_result.get_score()), 6), "metric": task.metadata.main_score,
            "type": task.metadata.type, "modalities": list(task.metadata.modalities),
            "splits": {split: round(float(task_result.get_score(splits=[split])), 6)
                       for split in task_result.scores}}
    missing = sorted({task.metadata.name for task in tasks} - set(summary["tasks"]))
    if missing:
        summary["not_run"] = missing
    write_json_atomically(out / SUMMARY_JSON, summary)
    (out / SUMMARY_MD).write_text(summary_markdown(summary), encoding="utf-8")
    outputs.seal()
    for line in summary_markdown(summary).splitlines()[2:]:
        say(line)
    return summary


@contextlib.contextmanager
def _datasets_bars(show: bool) -> Iterator[None]:
    """``datasets``' progress bars as asked inside the block, as they were after it."""
    from datasets.utils import logging as datasets_logging

    enabled = datasets_logging.is_progress_bar_enabled()
    if show or not enabled:
        yield
        return
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        datasets_logging.enable_progress_bar()


def summary_markdown(summary: dict) -> str:
    """The summary as a Markdown table (scores in %, mteb's main score of each task)."""
    lines = [f"# mteb: {summary['model']} ({summary['model_fingerprint']})", "",
             "| task | type | metric | main score (%) |", "|---|---|---|---:|"]
    for name, task in summary["tasks"].items():
        lines.append(f"| {name} | {task['type']} | {task['metric']} | {100 * task['main_score']:.2f} |")
    if summary.get("not_run"):
        lines += ["", f"Not run (mteb skipped them, e.g. a modality the model lacks): {', '.join(summary['not_run'])}"]
    return "\n".join(lines) + "\n"


def load_summary(out_dir: str | os.PathLike) -> dict:
    """``OUT/summary.json`` of an earlier run."""
    return json.loads((Path(out_dir) / SUMMARY_JSON).read_text(encoding="utf-8"))
