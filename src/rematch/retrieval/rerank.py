"""Reranking with the matching head (beyond the paper, which uses matching only in training).

The model trained with the multi-view matching loss can answer "is this document
relevant to this query? Yes/No" directly. A candidate's score is p(Yes), averaged over
the four views the branch was trained on: (raw query, raw document), (raw query, Z_d),
(Z_q, raw document), (Z_q, Z_d), computed in one packed row per candidate (so the four
views cost one sequence), ``batch_size`` rows per forward.

:func:`rerank_query` keeps those p(Yes) beside the reranked scores (and scores candidates
outside the top N on request), so an evaluation can measure the head itself: how well p(Yes)
separates a known positive from the negatives it reranked (``eval mmeb``'s ``rerank_auc``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from rematch.data.items import ItemLike, as_item, as_items
from rematch.matching import MatchSample, build_packed_batch, match_logits

VIEW_CHOICES = ("all", "raw")


@torch.inference_mode()
def matching_probabilities(model, query: ItemLike, documents: Sequence[ItemLike],
                           query_embedding: np.ndarray | None = None,
                           document_embeddings: np.ndarray | None = None,
                           batch_size: int = 8, views: str = "all") -> np.ndarray:
    """p(Yes) of each document for ``query`` (float64, len(documents)).

    Each (query, document) pair is its own packed row, so a document's score never
    depends on which other candidates it is scored with. Embeddings (for the Z views)
    are computed when not given; pass the ones you already have (e.g. from an index).
    """
    if views not in VIEW_CHOICES:
        raise ValueError(f"views must be one of {VIEW_CHOICES}, got {views!r}")
    query_item = as_item(query, 0, where="query")
    document_items = as_items(documents, where="candidate")
    if not document_items:
        return np.zeros(0)
    if query_embedding is None:
        query_embedding = model.encode([query_item], role="query")[0]
    if document_embeddings is None:
        document_embeddings = model.encode(document_items, role="document")
    was_training = model.training
    model.eval()
    scores = np.zeros(len(document_items))
    try:
        for start in range(0, len(document_items), batch_size):
            chunk = list(range(start, min(start + batch_size, len(document_items))))
            samples = [MatchSample(query_item, (document_items[i],), (True,)) for i in chunk]
            batch = build_packed_batch(model.adapter, samples, model.config.system_prompt,
                                       model.config.matching_instruction, where="rerank candidate")
            table = torch.as_tensor(np.stack([row for i in chunk for row in (query_embedding, document_embeddings[i])]),
                                    dtype=torch.float32, device=model.device)
            logits = match_logits(model, batch, table).float()  # (n, 4, 2): (query view, document view)
            p_yes = torch.softmax(logits, dim=-1)[..., 0].view(len(chunk), 2, 2)
            per_document = p_yes[:, 0, 0] if views == "raw" else p_yes.mean(dim=(1, 2))
            if not torch.isfinite(per_document).all():
                raise FloatingPointError("non-finite matching probability while reranking")
            scores[chunk] = per_document.double().cpu().numpy()
    finally:
        model.train(was_training)
    return scores


def check_rerank(top_n: int) -> None:
    """Validate a ``rerank`` argument before any encoding starts."""
    if top_n < 0:
        raise ValueError(f"rerank must be >= 0, got {top_n}")


def rerank(model, query: ItemLike, candidates: Sequence[ItemLike], top_n: int | None = None,
           **kwargs) -> list[int]:
    """Order (indices into ``candidates[:top_n]``) by matching-head p(Yes), best first.

    Ties keep the first-stage order, so the result is always a permutation of the top-N.
    """
    count = len(candidates) if top_n is None else min(top_n, len(candidates))
    scores = matching_probabilities(model, query, list(candidates)[:count], **kwargs)
    return _order(scores)


def _order(probabilities: np.ndarray) -> list[int]:
    """Best p(Yes) first; ties keep the given (first-stage) order."""
    return [int(i) for i in np.argsort(-probabilities, kind="stable")]


@dataclass
class Reranked:
    """One query's candidates after reranking, and the matching head's p(Yes) behind it."""

    scores: np.ndarray
    """The first-stage scores with the top N lifted above all others, in reranked order."""
    top: list[int]
    """The reranked candidates (indices into the list), in first-stage order."""
    probabilities: dict[int, float]
    """p(Yes) of every candidate the head scored: the top N, and those asked for with ``also_score``."""


def rerank_query(model, query: ItemLike, candidates: Sequence[ItemLike], scores: np.ndarray, top_n: int,
                 query_embedding: np.ndarray | None = None, candidate_embeddings: np.ndarray | None = None,
                 also_score: Sequence[int] = ()) -> Reranked:
    """Rerank one query's ``top_n`` first-stage candidates by the matching head (see :func:`reranked_scores`).

    ``also_score`` names candidates whose p(Yes) is wanted even outside the top N (an
    evaluation's known positive, to compare with the reranked negatives): they are scored in
    a forward of their own, so the top N's scores and order are those of a plain rerank,
    and their first-stage scores are kept.
    """
    scores = np.asarray(scores, dtype=np.float64)
    top = [int(i) for i in np.argsort(-scores, kind="stable")[:top_n]]
    embeddings = None if candidate_embeddings is None else np.asarray(candidate_embeddings)
    probabilities = matching_probabilities(model, query, [candidates[i] for i in top],
                                           query_embedding=query_embedding,
                                           document_embeddings=None if embeddings is None else embeddings[top])
    order = _order(probabilities)
    result = scores.copy()
    finite = scores[np.isfinite(scores)]
    ceiling = float(finite.max()) if finite.size else 0.0
    for position, index in enumerate(order):
        result[top[index]] = ceiling + 1.0 + (len(order) - position)
    scored = {index: float(p) for index, p in zip(top, probabilities)}
    extra = [int(i) for i in dict.fromkeys(also_score) if int(i) not in scored]
    if extra:
        extra_probabilities = matching_probabilities(
            model, query, [candidates[i] for i in extra], query_embedding=query_embedding,
            document_embeddings=None if embeddings is None else embeddings[extra])
        scored.update({index: float(p) for index, p in zip(extra, extra_probabilities)})
    return Reranked(result, top, scored)


def reranked_scores(model, query: ItemLike, candidates: Sequence[ItemLike], scores: np.ndarray, top_n: int,
                    query_embedding: np.ndarray | None = None,
                    candidate_embeddings: np.ndarray | None = None) -> np.ndarray:
    """One query's first-stage ``scores`` with its ``top_n`` best candidates re-scored by the reranker.

    The reranked candidates get scores above every other candidate, in reranked order, so
    ranking metrics apply unchanged. Candidates outside the top N keep their scores.
    """
    return rerank_query(model, query, candidates, scores, top_n, query_embedding=query_embedding,
                        candidate_embeddings=candidate_embeddings).scores
