"""The matching head per kind of view pair: its loss and accuracy as step-log metrics.

Why: the matching loss is one number over a sample's 8 (query view, document view) pairs.
When it sits at ln 2 it cannot say whether every kind of pair is at chance or one kind
learns while the others do not (issue 24: the soft-soft pair compares two embeddings the
contrastive loss already aligns, the raw-raw pair needs a comparison circuit). Broken down
by kind (:data:`rematch.matching.VIEW_KINDS`: raw-raw, raw-soft, soft-raw, soft-soft), the
log says which comparison the head has learnt, step by step.

They are measurements, not loss terms: computed without a graph from the answers the step
already has, with the same cross-entropy as the matching term (``loss.matching_vocabulary``),
and never added to the objective. The accuracy is the head's decision, p(Yes) > p(No) against
the label, as reranking reads it. Under several processes each is a mean over every process's
pairs (sums and counts in one all-reduce, as the item-mean loss terms of
:mod:`rematch.losses`), so the kinds averaged with their pair counts as weights give the
logged matching loss on every process.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from rematch.losses import global_means, matching_loss, yes_no_logits
from rematch.matching import VIEW_KINDS

LOSS_PREFIX = "matching_loss/"
ACCURACY_PREFIX = "matching_accuracy/"

#: The step-log columns, in order: the four losses, then the four accuracies.
VIEW_METRICS = tuple(f"{prefix}{kind}" for prefix in (LOSS_PREFIX, ACCURACY_PREFIX) for kind in VIEW_KINDS)

#: The loss plot's panels of these columns: (title, columns).
VIEW_PANELS = (("matching loss per view", tuple(LOSS_PREFIX + kind for kind in VIEW_KINDS)),
               ("matching accuracy per view", tuple(ACCURACY_PREFIX + kind for kind in VIEW_KINDS)))


@torch.no_grad()
def matching_by_view(answer_logits: torch.Tensor | None, labels: torch.Tensor | None, kinds: Sequence[str],
                     answer_token_ids: tuple[int, int] | None, device: torch.device) -> dict[str, torch.Tensor]:
    """``{"matching_loss/<kind>": mean, "matching_accuracy/<kind>": mean}`` over every process's pairs.

    ``answer_logits`` and ``labels`` are the matching term's own inputs (answers sample-major,
    pair-minor; logits over [Yes, No] or, with ``answer_token_ids``, over the vocabulary);
    ``kinds`` gives the kind of each answer of a sample (:func:`rematch.matching.pair_kinds`).
    None (a process without matching samples this step) contributes no pair, but every process
    must call this at every step the matching loss is on: it is a collective. A kind without a
    pair on any process is left out.
    """
    sums: dict[str, tuple[torch.Tensor, int]] = {}
    zero = torch.zeros((), dtype=torch.float32, device=device)
    if answer_logits is None or labels is None or not labels.numel():
        for name in VIEW_METRICS:
            sums[name] = (zero, 0)
        return global_means(sums)
    labels = labels.reshape(-1).to(answer_logits.device)
    losses = matching_loss(answer_logits, labels, reduction="none", answer_token_ids=answer_token_ids)
    correct = (yes_no_logits(answer_logits, answer_token_ids).argmax(dim=-1) == labels).float()
    if labels.numel() % len(kinds):
        raise ValueError(f"{labels.numel()} answers are not whole samples of {len(kinds)} pairs")
    kind_of_answer = list(kinds) * (labels.numel() // len(kinds))
    for kind in VIEW_KINDS:
        chosen = torch.tensor([k == kind for k in kind_of_answer], device=losses.device)
        count = int(chosen.sum())
        sums[LOSS_PREFIX + kind] = (losses[chosen].sum().float(), count)
        sums[ACCURACY_PREFIX + kind] = (correct[chosen].sum(), count)
    return global_means({name: sums[name] for name in VIEW_METRICS})


def split_view_metrics(terms: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A step's terms as (loss terms, per-view metrics rounded for the log): the step returns
    both in one dict, the loop logs the first as losses and the second as metrics."""
    losses = {name: value for name, value in terms.items() if name not in VIEW_METRICS}
    metrics = {name: round(float(terms[name]), 6) for name in VIEW_METRICS if name in terms}
    return losses, metrics
