"""ReMatch's losses, returned together as a dict of named terms.

L = w_cl * L_cl + w_orth * L_orth + w_qdm * L_qdm   (paper: 1, 0.5, 0.1)

* ``info_nce``: queries against every positive and hard negative of the GLOBAL batch,
  cosine similarity / tau. Across processes the embeddings are gathered and the local
  slice is put back with its gradient; every rank computes the same global loss and its
  term in the total is multiplied by the world size, so that after DDP's gradient
  averaging every parameter gets exactly the gradient one process would compute on the
  whole global batch. (The other terms are means over local items, which DDP's
  averaging already turns into global means.) The logged values are never scaled.
* ``orthogonality``: the mean squared cosine between distinct learnable-token states,
  2/(K(K-1)) * sum_{i<j} cos(e_i, e_j)^2, which keeps the K tokens complementary.
* ``matching_loss``: cross-entropy of the Yes/No answer over the two answer logits
  (a 2-way softmax over the "Yes" and "No" rows of the LM head; the full vocabulary is
  never computed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows concatenated; this rank's rows keep their autograd graph.

    Returns the gathered tensor and the offset of this rank's rows in it. Every rank
    must pass the same number of rows.
    """
    size = world_size()
    if size == 1:
        return local, 0
    gathered = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(gathered, local.detach().contiguous())
    rank = dist.get_rank()
    gathered[rank] = local
    return torch.cat(gathered, dim=0), rank * local.shape[0]


def info_nce(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
             temperature: float = 0.02) -> torch.Tensor:
    """InfoNCE of L2-normalised queries (b, d) against the global pool of positives and negatives.

    Query i's target is positive i; every other positive and every hard negative (from
    all processes) is a negative. The value is the mean over the global batch's queries
    (identical on every rank; each rank's gradient reaches only its own rows).
    """
    all_queries, _ = gather_with_grad(queries)
    all_positives, _ = gather_with_grad(positives)
    pool = all_positives
    if negatives is not None and negatives.shape[0] > 0:
        all_negatives, _ = gather_with_grad(negatives)
        pool = torch.cat([all_positives, all_negatives], dim=0)
    logits = all_queries.float() @ pool.float().T / temperature
    targets = torch.arange(all_queries.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets)


def orthogonality(token_states: torch.Tensor) -> torch.Tensor:
    """Mean over items of 2/(K(K-1)) * sum_{i<j} cos(e_i, e_j)^2 for states (n, K, d)."""
    k = token_states.shape[1]
    if k < 2:
        return token_states.new_zeros((), dtype=torch.float32)
    unit = F.normalize(token_states.float(), dim=-1)
    gram = unit @ unit.transpose(1, 2)
    off_diagonal = gram.pow(2).sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).pow(2).sum(dim=1)
    return (off_diagonal / (k * (k - 1))).mean()


def matching_loss(answer_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over [Yes, No] logits (..., 2); label 0 = "Yes" (relevant), 1 = "No"."""
    return F.cross_entropy(answer_logits.reshape(-1, 2).float(), labels.reshape(-1))


@dataclass
class LossWeights:
    contrastive: float = 1.0
    orthogonality: float = 0.5
    matching: float = 0.1


OBJECTIVE = "objective"


def objective(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor to backpropagate: the world-size-corrected objective when distributed, else the loss."""
    return terms.get(OBJECTIVE, terms["loss"])


class ReMatchLoss(nn.Module):
    """Combines the three terms; a term whose weight is 0 (or whose inputs are absent) is skipped.

    ``forward`` returns ``{"loss": total, "contrastive": ..., "orthogonality": ..., "matching": ...}``
    holding only the terms that were computed, so logs show what actually trained. Under
    several processes it adds ``"objective"``, the total to backpropagate (see
    :func:`objective`); ``"loss"`` stays the value a single process would report.
    """

    def __init__(self, weights: LossWeights | None = None, temperature: float = 0.02):
        super().__init__()
        self.weights = weights or LossWeights()
        if temperature <= 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a positive number, got {temperature}")
        self.temperature = temperature

    def forward(self, query_embeddings: torch.Tensor, positive_embeddings: torch.Tensor,
                negative_embeddings: torch.Tensor | None = None, token_states: torch.Tensor | None = None,
                answer_logits: torch.Tensor | None = None, answer_labels: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = query_embeddings.new_zeros((), dtype=torch.float32)
        objective_extra = None
        if self.weights.contrastive:
            terms["contrastive"] = info_nce(query_embeddings, positive_embeddings, negative_embeddings,
                                            self.temperature)
            total = total + self.weights.contrastive * terms["contrastive"]
            if world_size() > 1:
                # DDP averages gradients and each rank holds only its slice's share of this
                # global term: backpropagate it x world size (see the module docstring).
                objective_extra = (world_size() - 1) * self.weights.contrastive * terms["contrastive"]
        if self.weights.orthogonality and token_states is not None and token_states.shape[1] > 1:
            terms["orthogonality"] = orthogonality(token_states)
            total = total + self.weights.orthogonality * terms["orthogonality"]
        if self.weights.matching and answer_logits is not None:
            terms["matching"] = matching_loss(answer_logits, answer_labels)
            total = total + self.weights.matching * terms["matching"]
        terms["loss"] = total
        if objective_extra is not None:
            terms[OBJECTIVE] = total + objective_extra
        return terms
