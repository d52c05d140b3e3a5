"""The one place where search and evaluation call the matching-head reranker.

``Index.search(..., rerank=N)``, ``evaluate_mmeb(..., rerank=N)``,
``evaluate_retrieval(..., rerank=N)`` and the CLI ``--rerank N`` flags all come here, so
wiring the reranker (``rematch.retrieval.rerank.rerank``) means editing these two
functions only. Until then a non-zero ``rerank`` fails before any encoding starts.
"""

from __future__ import annotations

from typing import Sequence

from rematch.data.items import Item

RERANK_UNAVAILABLE = ("reranking with the matching head (--rerank / rerank=N) is not available yet; "
                      "run without it (rerank=0)")


def check_rerank(top_n: int) -> None:
    """Fail early (before encoding anything) if reranking is requested but cannot run."""
    if top_n < 0:
        raise ValueError(f"rerank must be >= 0, got {top_n}")
    if top_n:
        raise NotImplementedError(RERANK_UNAVAILABLE)


def rerank_order(model, query: Item, candidates: Sequence[Item], top_n: int) -> list[int]:
    """New order (indices into ``candidates``) of the first ``top_n`` candidates, best first.

    Will delegate to ``rematch.retrieval.rerank.rerank(model, query, candidates, top_n)``.
    """
    raise NotImplementedError(RERANK_UNAVAILABLE)


def reranked_scores(model, query: Item, candidates: Sequence[Item], scores, top_n: int):
    """``scores`` (one query's row) with its ``top_n`` best candidates re-scored in reranked order.

    The reranked candidates get scores above every other candidate, best first, so the
    ranking metrics apply unchanged to the result.
    """
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    top = np.argsort(-scores, kind="stable")[:top_n]
    order = rerank_order(model, query, [candidates[i] for i in top], len(top))
    if sorted(order) != list(range(len(top))):
        raise ValueError(f"the reranker returned {order!r}, not a permutation of range({len(top)})")
    result = scores.copy()
    ceiling = float(scores[np.isfinite(scores)].max()) if np.isfinite(scores).any() else 0.0
    for position, index in enumerate(order):
        result[top[index]] = ceiling + 1.0 + (len(order) - position)
    return result
