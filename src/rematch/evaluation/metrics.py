"""Ranking metrics on a score matrix and relevance labels: hit@k, recall@k, MRR, nDCG@k.

Everything is computed from the *rank of each relevant candidate*. Ranking is by score,
highest first; what decides a metric is how exact ties are ordered, so there are two
documented tie rules (``ties=``):

``"pessimistic"`` (the default)
    1. higher score first;
    2. among equal scores, the candidate with the LOWER relevance grade comes first
       (non-relevant before relevant): a correct candidate that only ties with a wrong
       one is never credited with the better position, so a model that gives every
       candidate the same score (a collapsed embedding) scores 0 hit@1 instead of 100;
    3. among equal scores and equal grades, the lower candidate index comes first.

``"list_order"``
    1. higher score first;
    2. among equal scores, the lower candidate index comes first, whatever the grades.

    This is the order of a stable sort by descending score, and the rule behind numpy's
    ``argmax`` (it returns the first maximum). The official MMEB scripts score a query by
    ``argmax`` over its own list with the answer at index 0, so under this rule a tie
    with candidate 0 is a hit, exactly as there (see :mod:`rematch.evaluation.mmeb`).

So, for relevant candidate ``j`` of a query with scores ``s`` and grades ``g``::

    pessimistic: rank_j = 1 + #{i: s_i > s_j} + #{i != j: s_i == s_j and (g_i < g_j or (g_i == g_j and i < j))}
    list_order:  rank_j = 1 + #{i: s_i > s_j} + #{i < j: s_i == s_j}

With float scores the two only differ when a candidate scores exactly the same as a
relevant one, which in practice means an exact duplicate of the correct item in the
list (the MMEB report counts these as ``positive_duplicates``).

Gains for nDCG are linear in the grade (as trec_eval and BEIR compute it); a grade of 0
or below means "not relevant". Scores must be finite: a NaN or inf is an error, since
comparisons with NaN are always false and would silently count as a win.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

#: The comparison block (queries x relevant x candidates) is processed in chunks of this many elements.
_BLOCK_ELEMENTS = 1 << 24

#: The tie rules :func:`ranks_of_relevant` knows (see the module docstring).
TIE_RULES = ("pessimistic", "list_order")


@dataclass(frozen=True)
class RelevantRanks:
    """The rank of every relevant candidate of every query, padded to a rectangle.

    ``ranks[q, r]`` is the 1-based rank of the r-th relevant candidate of query q, 0 where
    the row is padding; ``grades[q, r]`` its relevance grade (0 for padding).
    """

    ranks: np.ndarray   # (n_queries, max_relevant) int64
    grades: np.ndarray  # (n_queries, max_relevant) float64

    @property
    def valid(self) -> np.ndarray:
        return self.ranks > 0

    def __len__(self) -> int:
        return self.ranks.shape[0]


def check_finite(scores: np.ndarray, what: str = "scores") -> None:
    """Raise naming the first query row that holds a NaN or infinite score."""
    finite = np.isfinite(scores)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        raise FloatingPointError(f"{what}: non-finite value(s) in row {row}; refusing to rank NaN/inf scores")


def ranks_of_relevant(scores: np.ndarray, relevant_index: np.ndarray, relevant_grade: np.ndarray | None = None,
                      candidate_grades: np.ndarray | None = None, ties: str = "pessimistic") -> RelevantRanks:
    """Ranks of given relevant candidates under the documented tie order ``ties`` (one of :data:`TIE_RULES`).

    scores: (n_q, n_c) finite, except that ``-inf`` may pad ragged candidate lists.
    relevant_index: (n_q, R) candidate indices, -1 for padding.
    relevant_grade: (n_q, R) grades > 0 (default 1).
    candidate_grades: (n_q, n_c) grade of every candidate (default: taken from the
      relevant lists, 0 elsewhere). Only needed to order ties between graded candidates.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    scores = np.asarray(scores)
    relevant_index = np.asarray(relevant_index, dtype=np.int64)
    if scores.ndim != 2 or relevant_index.ndim != 2 or relevant_index.shape[0] != scores.shape[0]:
        raise ValueError(f"scores must be (n_q, n_c) and relevant_index (n_q, R); got {scores.shape} and "
                         f"{relevant_index.shape}")
    if np.isnan(scores).any() or np.isposinf(scores).any():
        check_finite(np.where(np.isneginf(scores), 0.0, scores))
    n_q, n_c = scores.shape
    valid = relevant_index >= 0
    if (relevant_index >= n_c).any():
        raise ValueError(f"relevant_index holds a candidate index >= the number of candidates ({n_c})")
    grade = np.ones(relevant_index.shape) if relevant_grade is None else np.asarray(relevant_grade, dtype=np.float64)
    grade = np.where(valid, grade, 0.0)
    if (valid & (grade <= 0)).any():
        raise ValueError("relevant candidates must have a grade > 0")
    safe_index = np.where(valid, relevant_index, 0)
    if candidate_grades is None:
        candidate_grades = np.zeros((n_q, n_c))
        rows = np.broadcast_to(np.arange(n_q)[:, None], safe_index.shape)
        candidate_grades[rows[valid], safe_index[valid]] = grade[valid]
    relevant_scores = np.take_along_axis(scores, safe_index, axis=1)
    if np.isneginf(relevant_scores[valid]).any():
        raise ValueError("a relevant candidate has score -inf (is it padding?)")

    ranks = np.zeros(relevant_index.shape, dtype=np.int64)
    width = max(1, relevant_index.shape[1])
    chunk = max(1, _BLOCK_ELEMENTS // max(1, width * n_c))
    positions = np.arange(n_c)
    for start in range(0, n_q, chunk):
        stop = min(n_q, start + chunk)
        s = scores[start:stop, None, :]                     # (c, 1, n_c)
        g = candidate_grades[start:stop, None, :]
        s_r = relevant_scores[start:stop, :, None]          # (c, R, 1)
        g_r = grade[start:stop, :, None]
        j = safe_index[start:stop, :, None]
        ahead = s > s_r
        if ties == "list_order":
            tied_before = (s == s_r) & (positions < j)
        else:
            tied_before = (s == s_r) & ((g < g_r) | ((g == g_r) & (positions < j)))
        ranks[start:stop] = 1 + ahead.sum(-1) + tied_before.sum(-1)
    ranks[~valid] = 0
    return RelevantRanks(ranks=ranks, grades=grade)


def relevant_ranks(scores: np.ndarray, relevance: np.ndarray, ties: str = "pessimistic") -> RelevantRanks:
    """Dense form: ``relevance`` is an (n_q, n_c) grade matrix (> 0 = relevant).

    Every query needs at least one relevant candidate (an error names those that do not).
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevance = np.asarray(relevance, dtype=np.float64)
    if scores.shape != relevance.shape:
        raise ValueError(f"scores {scores.shape} and relevance {relevance.shape} differ in shape")
    check_finite(scores)
    is_relevant = relevance > 0
    empty = np.flatnonzero(~is_relevant.any(axis=1))
    if empty.size:
        raise ValueError(f"queries {empty[:10].tolist()} have no relevant candidate; metrics are undefined for them")
    width = int(is_relevant.sum(axis=1).max())
    # stable argsort of "not relevant" puts each row's relevant indices first, in index order
    order = np.argsort(~is_relevant, axis=1, kind="stable")[:, :width]
    index = np.where(np.take_along_axis(is_relevant, order, axis=1), order, -1)
    grade = np.where(index >= 0, np.take_along_axis(relevance, order, axis=1), 0.0)
    return ranks_of_relevant(scores, index, grade, candidate_grades=np.clip(relevance, 0, None), ties=ties)


def hit_at_k(ranks: RelevantRanks, k: int) -> np.ndarray:
    """1.0 where some relevant candidate is in the top k (hit@1 = precision@1 for one positive)."""
    return (ranks.valid & (ranks.ranks <= k)).any(axis=1).astype(np.float64)


def recall_at_k(ranks: RelevantRanks, k: int) -> np.ndarray:
    """Fraction of a query's relevant candidates found in the top k."""
    found = (ranks.valid & (ranks.ranks <= k)).sum(axis=1)
    return found / _relevant_counts(ranks)


def reciprocal_rank(ranks: RelevantRanks) -> np.ndarray:
    """1 / rank of the best-ranked relevant candidate (averaged over queries = MRR)."""
    _relevant_counts(ranks)
    best = np.where(ranks.valid, ranks.ranks, np.iinfo(np.int64).max).min(axis=1)
    return 1.0 / best


def ndcg_at_k(ranks: RelevantRanks, k: int) -> np.ndarray:
    """Normalised discounted cumulative gain with linear gains: sum g / log2(rank + 1), over the ideal."""
    _relevant_counts(ranks)
    in_top = ranks.valid & (ranks.ranks <= k)
    discounts = np.log2(np.where(in_top, ranks.ranks, 1) + 1.0)
    dcg = np.where(in_top, ranks.grades / discounts, 0.0).sum(axis=1)
    ideal_grades = -np.sort(-ranks.grades, axis=1)[:, :k]
    ideal = (ideal_grades / np.log2(np.arange(ideal_grades.shape[1]) + 2.0)).sum(axis=1)
    return dcg / ideal


def per_query_metrics(ranks: RelevantRanks, hit_ks: Iterable[int] = (), recall_ks: Iterable[int] = (),
                      ndcg_ks: Iterable[int] = (), mrr: bool = True) -> dict[str, np.ndarray]:
    """Named per-query metric arrays, e.g. ``{"hit@1": ..., "recall@10": ..., "ndcg@10": ..., "mrr": ...}``."""
    result: dict[str, np.ndarray] = {}
    for k in hit_ks:
        result[f"hit@{k}"] = hit_at_k(ranks, k)
    for k in recall_ks:
        result[f"recall@{k}"] = recall_at_k(ranks, k)
    for k in ndcg_ks:
        result[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    if mrr:
        result["mrr"] = reciprocal_rank(ranks)
    return result


def mean_metrics(per_query: dict[str, np.ndarray]) -> dict[str, float]:
    """Average per-query metrics over queries (plain means, every query weighs the same)."""
    return {name: float(values.mean()) for name, values in per_query.items()}


def compute_metrics(scores: np.ndarray, relevance: np.ndarray, hit_ks: Sequence[int] = (1, 5),
                    recall_ks: Sequence[int] = (1, 5, 10), ndcg_ks: Sequence[int] = (10,),
                    ties: str = "pessimistic") -> dict[str, float]:
    """Mean metrics of a dense score matrix against a dense relevance-grade matrix."""
    return mean_metrics(per_query_metrics(relevant_ranks(scores, relevance, ties), hit_ks, recall_ks, ndcg_ks))


def _relevant_counts(ranks: RelevantRanks) -> np.ndarray:
    counts = ranks.valid.sum(axis=1)
    if (counts == 0).any():
        raise ValueError(f"queries {np.flatnonzero(counts == 0)[:10].tolist()} have no relevant candidate")
    return counts
