"""ReMatch's losses, returned together as a dict of named terms.

L = w_cl * L_cl + w_orth * L_orth + w_qdm * L_qdm   (paper: 1, 0.5, 0.1)

* ``info_nce``: queries against every positive and hard negative of the GLOBAL batch,
  cosine similarity / tau.
* ``orthogonality``: the mean squared cosine between distinct learnable-token states,
  2/(K(K-1)) * sum_{i<j} cos(e_i, e_j)^2, which keeps the K tokens complementary.
* ``matching_loss``: cross-entropy of the Yes/No answer at each answer position, in one of
  two forms (``loss.matching_vocabulary``): ``full``, the paper's L_qdm, the generative
  cross-entropy over the whole vocabulary with the "Yes" or "No" token as the target (the
  logits are computed at the answer positions only); ``yes_no``, a 2-way softmax over the
  "Yes" and "No" rows of the LM head (the full vocabulary is never computed).

Several processes: every term's VALUE is the one a single process would compute on the
global batch (the concatenation of every rank's rows, in rank order), and its GRADIENT
reaches only this rank's rows. Ranks may hold different numbers of rows (rows with and
without hard negatives, a bad row skipped on one rank, a rank with no matching sample):

* the contrastive term gathers every rank's embeddings (row counts first, then padded
  rows, then each rank's real rows cut out) and puts the local slice back with its graph;
  every rank computes the same global mean over all N queries;
* the other terms are means over items (token states, matching pairs): each rank sums its
  own items, one all-reduce gives the global sum and count, and the term is
  ``(local_sum + stop_gradient(global_sum - local_sum)) / global_count``.

So every term is ``L(global)`` with a gradient ``dL/d(local rows) * d(local rows)/dθ``,
and summing that over ranks gives exactly the single-process gradient. DDP *averages*
gradients, so each rank backpropagates ``world_size * loss`` (``"objective"``); this stays
exact whatever the per-rank row counts are, because no term is a local mean any more.
The logged values are never scaled. Every rank makes the same collective calls in the
same order (which terms run depends on the weights only, never on a rank's data), so an
uneven batch can neither corrupt a value nor leave NCCL waiting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from rematch.distributed import world_size


def gather_with_grad(*locals_: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Each tensor's rows from every rank, concatenated in rank order; this rank's rows keep their graph.

    Ranks may hold different numbers of rows (zero included); the trailing dimensions and
    dtype must agree. Returns ``(gathered, offset of this rank's rows)`` per tensor. One
    all-gather of the row counts serves every tensor, then one padded all-gather each.
    """
    size = world_size()
    if size == 1:
        return [(local, 0) for local in locals_]
    device = locals_[0].device
    counts = torch.tensor([t.shape[0] for t in locals_], dtype=torch.long, device=device)
    all_counts = [torch.empty_like(counts) for _ in range(size)]
    dist.all_gather(all_counts, counts)
    per_rank = torch.stack(all_counts).tolist()  # [rank][tensor]
    rank = dist.get_rank()
    results = []
    for index, local in enumerate(locals_):
        rows = [per_rank[r][index] for r in range(size)]
        largest = max(rows)
        if largest == 0:  # no rank has a row: every rank skips the same call
            results.append((local, 0))
            continue
        padded = local.detach().new_zeros((largest, *local.shape[1:]))
        padded[:local.shape[0]] = local.detach()
        buffers = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(buffers, padded)
        pieces = [buffers[r][:rows[r]] for r in range(size)]
        pieces[rank] = local
        results.append((torch.cat(pieces, dim=0), sum(rows[:rank])))
    return results


def info_nce(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
             temperature: float = 0.02) -> torch.Tensor:
    """InfoNCE of L2-normalised queries (b, d) against the global pool of positives and negatives.

    Query i's target is positive i; every other positive and every hard negative (from
    all processes) is a negative. The value is the mean over the global batch's queries
    (identical on every rank; each rank's gradient reaches only its own rows). Under
    several processes the negatives are always gathered (an absent or empty local set
    counts as zero rows), so whether there are negatives is decided across ranks.
    """
    if queries.shape[0] != positives.shape[0]:
        raise ValueError(f"{queries.shape[0]} queries but {positives.shape[0]} positives: they must pair up")
    if world_size() > 1:
        local_negatives = negatives if negatives is not None else positives.new_zeros((0, positives.shape[1]))
        (all_queries, _), (all_positives, _), (all_negatives, _) = gather_with_grad(
            queries, positives, local_negatives.to(positives.dtype))
    else:
        all_queries, all_positives = queries, positives
        all_negatives = negatives if negatives is not None else positives[:0]
    pool = torch.cat([all_positives, all_negatives], dim=0) if all_negatives.shape[0] else all_positives
    logits = all_queries.float() @ pool.float().T / temperature
    targets = torch.arange(all_queries.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets)


def orthogonality_per_item(token_states: torch.Tensor) -> torch.Tensor:
    """2/(K(K-1)) * sum_{i<j} cos(e_i, e_j)^2 for each item of states (n, K, d): shape (n,)."""
    n, k = token_states.shape[:2]
    if k < 2:
        return token_states.new_zeros((n,), dtype=torch.float32)
    unit = F.normalize(token_states.float(), dim=-1)
    gram = unit @ unit.transpose(1, 2)
    off_diagonal = gram.pow(2).sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).pow(2).sum(dim=1)
    return off_diagonal / (k * (k - 1))


def orthogonality(token_states: torch.Tensor) -> torch.Tensor:
    """Mean over items of 2/(K(K-1)) * sum_{i<j} cos(e_i, e_j)^2 for states (n, K, d)."""
    return orthogonality_per_item(token_states).mean()


def matching_loss(answer_logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
                  answer_token_ids: tuple[int, int] | None = None) -> torch.Tensor:
    """Cross-entropy of the answers; label 0 = "Yes" (relevant), 1 = "No".

    Without ``answer_token_ids`` the logits are the [Yes, No] pair (..., 2) and this is the
    2-way cross-entropy (``yes_no``). With them the logits span the vocabulary (..., V) and
    the target of label 0 is token ``answer_token_ids[0]`` ("Yes"), of label 1 token
    ``answer_token_ids[1]`` ("No"): the generative cross-entropy of a causal LM (``full``),
    computed in float32 as transformers computes it.
    """
    if answer_token_ids is None:
        return F.cross_entropy(answer_logits.reshape(-1, 2).float(), labels.reshape(-1), reduction=reduction)
    targets = torch.tensor(answer_token_ids, dtype=torch.long, device=labels.device)[labels.reshape(-1)]
    return F.cross_entropy(answer_logits.reshape(-1, answer_logits.shape[-1]).float(), targets, reduction=reduction)


def yes_no_logits(answer_logits: torch.Tensor, answer_token_ids: tuple[int, int] | None = None) -> torch.Tensor:
    """The [Yes, No] logits (N, 2) of answers given as :func:`matching_loss` takes them: the
    pair itself, or its two columns of vocabulary logits. What reranking's p(Yes) / (p(Yes) +
    p(No)) and the matching accuracy read, whichever loss trained the head."""
    if answer_token_ids is None:
        return answer_logits.reshape(-1, 2)
    return answer_logits.reshape(-1, answer_logits.shape[-1])[:, list(answer_token_ids)]


def global_means(local_sums: dict[str, tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Per term, the mean over every rank's items, with a gradient through this rank's sum only.

    ``local_sums`` maps a term to (sum over this rank's items, their count); every rank
    must pass the same terms (a rank without items passes a zero sum and count 0). One
    all-reduce serves all terms. A term with no item on any rank is left out.
    """
    if not local_sums:
        return {}
    names = list(local_sums)
    if world_size() == 1:
        return {name: local_sums[name][0] / local_sums[name][1] for name in names if local_sums[name][1]}
    sums = torch.stack([local_sums[n][0].detach().double().reshape(()) for n in names])
    counts = torch.tensor([float(local_sums[n][1]) for n in names], dtype=torch.float64, device=sums.device)
    totals = torch.stack([sums, counts])
    dist.all_reduce(totals)
    global_sums, global_counts, local_values = torch.cat([totals, sums[None]]).tolist()  # one device sync
    means = {}
    for name, global_sum, local_value, count in zip(names, global_sums, local_values, global_counts):
        if round(count):
            means[name] = (local_sums[name][0] + (global_sum - local_value)) / round(count)
    return means


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
    """Combines the three terms; a term whose weight is 0 (or whose inputs are absent everywhere) is skipped.

    ``forward`` returns ``{"loss": total, "contrastive": ..., "orthogonality": ..., "matching": ...}``
    holding only the terms that were computed, so logs show what actually trained. Under
    several processes it adds ``"objective"``, the total to backpropagate (see
    :func:`objective` and the module docstring); ``"loss"`` and the terms stay the values
    a single process would report on the global batch.

    ``answer_logits`` of shape (0, 2) (a rank whose matching plan is empty this step) is
    fine: it contributes no pair, and the ranks still agree on the collective calls.

    ``answer_token_ids`` ("Yes", "No" token ids) says the answer logits span the vocabulary
    and the matching term is the generative cross-entropy (``loss.matching_vocabulary:
    full``); None: they are the [Yes, No] pair and the term is 2-way (``yes_no``).
    """

    def __init__(self, weights: LossWeights | None = None, temperature: float = 0.02,
                 answer_token_ids: tuple[int, int] | None = None):
        super().__init__()
        self.weights = weights or LossWeights()
        if temperature <= 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a positive number, got {temperature}")
        self.temperature = temperature
        self.answer_token_ids = answer_token_ids

    def forward(self, query_embeddings: torch.Tensor, positive_embeddings: torch.Tensor,
                negative_embeddings: torch.Tensor | None = None, token_states: torch.Tensor | None = None,
                answer_logits: torch.Tensor | None = None, answer_labels: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        zero = query_embeddings.new_zeros((), dtype=torch.float32)
        if self.weights.contrastive:
            terms["contrastive"] = info_nce(query_embeddings, positive_embeddings, negative_embeddings,
                                            self.temperature)
        # Item means: which terms enter the all-reduce depends on the weights only (the same
        # on every rank); a rank without items for a term sends a zero sum and count 0.
        item_sums: dict[str, tuple[torch.Tensor, int]] = {}
        if self.weights.orthogonality:
            if token_states is not None and token_states.shape[1] > 1 and token_states.shape[0]:
                item_sums["orthogonality"] = (orthogonality_per_item(token_states).sum(), token_states.shape[0])
            else:
                item_sums["orthogonality"] = (zero, 0)
        if self.weights.matching:
            if answer_logits is not None and answer_logits.numel():
                if answer_labels is None:
                    raise ValueError("answer_logits were given without answer_labels")
                pairs = answer_labels.numel()
                item_sums["matching"] = (matching_loss(answer_logits, answer_labels, reduction="sum",
                                                       answer_token_ids=self.answer_token_ids), pairs)
            else:
                item_sums["matching"] = (zero, 0)
        terms.update(global_means(item_sums))
        total = zero
        for name in ("contrastive", "orthogonality", "matching"):
            if name in terms:
                total = total + getattr(self.weights, name) * terms[name]
        terms["loss"] = total
        if world_size() > 1:
            # DDP averages gradients over ranks, and each rank's graph holds only its own rows'
            # share of the global loss: backpropagate it x world size (see the module docstring).
            terms[OBJECTIVE] = world_size() * total
        return terms
