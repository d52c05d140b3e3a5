"""Score one MMEB-V2 ranking task: deduplicate, encode through the shared cache, rank, measure.

The same machinery as ``eval mmeb`` (:mod:`rematch.evaluation.mmeb`), generalised to the
two V2 rankings (a shared pool, or each query's own candidates) and to several graded
correct candidates:

1. every distinct query is embedded once as a query and every distinct pool item once as
   a document (QA options and class labels repeat across queries), through the
   :class:`~rematch.encoding.cache.CachedEncoder` (on-disk cache, strided shards across
   ``torch.distributed`` ranks); documents are encoded as the official harness writes them
   (a video or a page with the task's candidate text, "Understand the content of the
   provided video." / "... document image."; a class label or a QA option bare), with no
   target instruction of the model's (:func:`rematch.instructions.as_written`);
2. scores are cosine similarities (dot products of unit vectors), ranked per query;
3. metrics from the rank of each correct candidate (:mod:`rematch.evaluation.metrics`):
   hit@1 and hit@5 (any correct candidate in the top k), NDCG@5 with linear gains in the
   relevance grade (the official ``ndcg_linear@5``), MRR.

Ties: the official harness ranks with ``numpy.argsort`` of the negated scores, whose order
among exact ties is unspecified; here ties keep list order (pool order for global tasks,
the row's candidate order for local ones), recorded as ``tie_rule: "official"``, and the
pessimistic rule (a tie with a wrong candidate ranks the correct one last) is reported
beside it as ``hit@1_strict`` and ``ndcg@5_strict``. The two differ only on exact ties,
counted as ``ties_at_top``.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, Sequence

import numpy as np

from rematch.data.items import Item, ItemError, as_item
from rematch.encoding.cache import CachedEncoder
from rematch.encoding.distributed import encode_across_ranks
from rematch.evaluation.metrics import (
    RelevantRanks, check_finite, hit_at_k, ndcg_at_k, per_query_metrics, ranks_of_relevant)
from rematch.evaluation.mmeb import EvalDataError
from rematch.evaluation.settings import model_config_of
from rematch.evaluation.mmeb_v2.records import RankingTask
from rematch.evaluation.mmeb_v2.tasks import TaskSpec
from rematch.instructions import as_written

#: Score blocks are kept under this many floats (queries x candidates).
_SCORE_BLOCK = 1 << 23
#: The tie rule hit@k, NDCG@k and MRR are reported under, and the one of the "_strict" variants.
TIE_RULE = "official"
_OFFICIAL_TIES, _STRICT_TIES = "list_order", "pessimistic"
#: NDCG cut-off of the document tasks' score.
NDCG_K = 5


class _Unique:
    """Validated items reduced to distinct ones (by ``Item.cache_key``), remembering where each was first used."""

    def __init__(self, role: str):
        self.role = role
        self.items: list[Item] = []
        self.where: list[str] = []
        self._ids: dict[str, int] = {}

    def add(self, value, where: str) -> int:
        """The index of ``value`` among the distinct items; validated (``as_item``) on every use, so a
        bad item is named by the row that holds it (cheap: QA options and labels are short texts)."""
        try:
            item = as_item(value, 0, where)
        except ItemError as error:
            raise EvalDataError(str(error).replace(f"{where} 0", where, 1)) from error
        key = item.cache_key()
        index = self._ids.get(key)
        if index is None:
            index = self._ids[key] = len(self.items)
            self.items.append(item)
            self.where.append(where)
        return index

    def row_using(self, path: str) -> str | None:
        """Where the first item showing the file ``path`` (an image or a video) was used."""
        for item, where in zip(self.items, self.where):
            for source in (item.image, getattr(item, "video", None)):
                if isinstance(source, (str, os.PathLike)) and os.path.normpath(str(source)) == os.path.normpath(path):
                    return where
        return None


@contextlib.contextmanager
def _errors_named_by_row(unique: _Unique) -> Iterator[None]:
    """An image or video that fails while encoding becomes an error naming the row that uses it."""
    try:
        yield
    except ItemError as error:
        path = getattr(error, "path", None)
        row = unique.row_using(path) if path else None
        if row is None:
            raise
        reason = str(error).split(": ", 1)[-1]
        raise EvalDataError(f"{row}: {reason} (--skip-bad / skip_bad=True skips rows whose files cannot be "
                            "read)") from error


def _missing_files(unique: _Unique) -> None:
    """Fail before encoding if an image file (or a video file or frame directory) is gone."""
    for item, where in zip(unique.items, unique.where):
        if isinstance(item.image, (str, os.PathLike)) and not os.path.isfile(item.image):
            raise EvalDataError(f"{where}: field 'image': image file not found: {item.image}")
        video = getattr(item, "video", None)
        if isinstance(video, (str, os.PathLike)) and not os.path.exists(video):
            raise EvalDataError(f"{where}: field 'video': video not found: {video}")


def _relevant_arrays(relevant: Sequence[dict[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Padded (n, R) index and grade arrays of each query's correct candidates (-1 / 0 padding)."""
    width = max(len(r) for r in relevant)
    index = np.full((len(relevant), width), -1, dtype=np.int64)
    grade = np.zeros((len(relevant), width), dtype=np.float64)
    for row, judged in enumerate(relevant):
        index[row, :len(judged)] = list(judged)
        grade[row, :len(judged)] = list(judged.values())
    return index, grade


def _ranks(scores: np.ndarray, relevant: Sequence[dict[int, float]]) -> tuple[RelevantRanks, RelevantRanks]:
    index, grade = _relevant_arrays(relevant)
    return (ranks_of_relevant(scores, index, grade, ties=_OFFICIAL_TIES),
            ranks_of_relevant(scores, index, grade, ties=_STRICT_TIES))


def _chunks(total: int, width: int) -> Iterator[tuple[int, int]]:
    step = max(1, _SCORE_BLOCK // max(1, width))
    for start in range(0, total, step):
        yield start, min(total, start + step)


def evaluate_ranking_task(encoder: CachedEncoder, spec: TaskSpec, task: RankingTask,
                          ks: Sequence[int] = (1, 5)) -> dict:
    """Metrics of one video or document task (a JSON-ready dict; see the module docstring)."""
    start = time.perf_counter()
    config = model_config_of(encoder.model)
    if not task.examples:
        raise EvalDataError(f"task {task.name}: no queries")
    queries, documents = _Unique("query"), _Unique("document")
    query_index = np.array([queries.add(example.query, f"{_where(example, task.name, n)}: query")
                            for n, example in enumerate(task.examples)])
    pool_to_unique = np.array([documents.add(item, f"{where}: candidate {task.pool_ids[i]!r}")
                               for i, (item, where) in enumerate(zip(task.pool, task.pool_where))], dtype=np.int64)
    _missing_files(queries)
    _missing_files(documents)
    with _errors_named_by_row(queries):
        query_vectors = encode_across_ranks(encoder, queries.items, "query")
    with _errors_named_by_row(documents):
        document_vectors = encode_across_ranks(encoder, as_written(documents.items, config), "document")

    ks = tuple(sorted(set(ks) | {1}))
    is_global = all(example.candidates is None for example in task.examples)
    per_query: dict[str, list[np.ndarray]] = {}
    lengths = []
    ties_at_top = 0
    pool_width = len(task.pool)
    longest = pool_width if is_global else max(len(e.candidates or task.pool) for e in task.examples)
    for begin, end in _chunks(len(task.examples), longest):
        examples = task.examples[begin:end]
        block = query_vectors[query_index[begin:end]] @ document_vectors.T        # (c, unique documents)
        scores = np.full((len(examples), longest), -np.inf, dtype=np.float64)
        relevant = []
        for row, example in enumerate(examples):
            if example.candidates is None:  # the whole pool, in pool order
                scores[row, :pool_width] = block[row, pool_to_unique]
                relevant.append(dict(example.relevant))
                lengths.append(pool_width)
                continue
            own = np.asarray(example.candidates, dtype=np.int64)
            scores[row, :len(own)] = block[row, pool_to_unique[own]]
            position = {int(p): i for i, p in enumerate(own)}
            relevant.append({position[p]: g for p, g in example.relevant.items()})
            lengths.append(len(own))
        check_finite(np.where(np.isneginf(scores), 0.0, scores), f"{task.name} scores")
        official, strict = _ranks(scores, relevant)
        values = per_query_metrics(official, hit_ks=ks, ndcg_ks=(NDCG_K,), mrr=True)
        values["hit@1_strict"] = hit_at_k(strict, 1)
        values[f"ndcg@{NDCG_K}_strict"] = ndcg_at_k(strict, NDCG_K)
        for name, array in values.items():
            per_query.setdefault(name, []).append(array)
        ties_at_top += int((hit_at_k(official, 1) > hit_at_k(strict, 1)).sum())
    metrics = {name: float(np.concatenate(arrays).mean()) for name, arrays in per_query.items()}
    order = [f"hit@{k}" for k in ks] + ["hit@1_strict", f"ndcg@{NDCG_K}", f"ndcg@{NDCG_K}_strict", "mrr"]
    lengths = np.asarray(lengths)
    relevant_counts = np.array([len(example.relevant) for example in task.examples])
    return {
        "subset": task.name,
        "modality": spec.modality,
        "category": spec.category,
        "family": spec.family,
        "official": spec.official,
        "primary_metric": spec.primary_metric,
        "score": round(metrics[spec.primary_metric], 6),
        "count": len(task.examples),
        **{name: round(metrics[name], 6) for name in order},
        "ranking": "global" if is_global else "local",
        "pool_size": pool_width,
        "candidates_per_query": {"min": int(lengths.min()), "max": int(lengths.max()),
                                 "mean": round(float(lengths.mean()), 2)},
        "relevant_per_query": {"min": int(relevant_counts.min()), "max": int(relevant_counts.max()),
                               "mean": round(float(relevant_counts.mean()), 2)},
        "unique_queries": len(queries.items),
        "unique_candidates": len(documents.items),
        "ties_at_top": ties_at_top,
        "tie_rule": TIE_RULE,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _where(example, task: str, number: int) -> str:
    return str(example.ref) if example.ref is not None else f"{task} example {number}"


__all__ = ["NDCG_K", "TIE_RULE", "evaluate_ranking_task"]
