"""The ``matching`` objective of pre-training: a true caption against its foil, in the matching layout.

Why this objective (docs/pretraining.md, issue 24): verification asked as a chat question
("Does this caption describe the image? ... Yes/No") never left the Yes/No prior in any
recipe, and neither did the matching loss of the demo. Asked the way ReMatch's matching
branch asks -- the packed sequence of :mod:`rematch.matching`, one query and two documents,
the relevant one and a compositional foil that differs from it in one stated way -- the same
tiny backbone learns to separate colour and size foils within a few hundred steps: the two
answers of a sample share everything but the difference, so the loss pushes on exactly the
comparison. It also trains the layout the matching head works in (content blocks that see
only the prompt and themselves, answers that see their pair), which the chat prompt does not.

Only the (raw query, raw document) pairs are scored: a backbone being pre-trained has no
ReMatch embeddings to make soft views from, so the soft blocks keep their placeholder token
and the answers that read them carry no loss.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from rematch.data.items import Item
from rematch.matching import (
    QUERY_VIEWS,
    MatchBatch,
    MatchSample,
    build_packed_batch,
    document_blocks,
    view_pairs,
)
from rematch.training.answers import separation_auc
from rematch.world.pretrain_corpus import SINGLE_ATTRIBUTE_FOILS, VerificationPair

NUM_DOCUMENTS = 2  # the true side and the foil
#: Answer columns of a sample whose query view and document view are both raw.
RAW_PAIRS = tuple(column for column, (query, document) in enumerate(view_pairs(NUM_DOCUMENTS))
                  if query == QUERY_VIEWS[0] and document in {document_blocks(j)[0] for j in range(NUM_DOCUMENTS)})


def match_sample(pair: VerificationPair, image_size: int, true_first: bool) -> MatchSample:
    """The pair as the matching branch sees it: image -> (caption, foil), or caption -> (scene, foil scene)."""
    if pair.image_query:
        query = Item(image=pair.image(image_size))
        documents = [Item(text=pair.caption), Item(text=pair.foil)]
    else:
        query = Item(text=pair.caption)
        documents = [Item(image=pair.image(image_size)), Item(image=pair.foil_image(image_size))]
    order = (0, 1) if true_first else (1, 0)
    return MatchSample(query, tuple(documents[k] for k in order), tuple(k == 0 for k in order))


@dataclass
class VerificationBatch:
    """Packed matching rows of verification pairs, with each pair's foil kind (for reports)."""

    match: MatchBatch
    kinds: list[str]

    def to(self, device: torch.device | str) -> "VerificationBatch":
        return VerificationBatch(self.match.to(device), self.kinds)


class VerificationCollator:
    """Verification pairs -> one packed matching row each. The true side's slot alternates with
    the pair's index in the batch, so the slot never tells the label."""

    def __init__(self, adapter, image_size: int, system_prompt: str, instruction: str):
        self.adapter, self.image_size = adapter, image_size
        self.system_prompt, self.instruction = system_prompt, instruction

    def __call__(self, pairs: Sequence[VerificationPair]) -> VerificationBatch:
        samples = [match_sample(pair, self.image_size, true_first=number % 2 == 0) for number, pair in enumerate(pairs)]
        batch = build_packed_batch(self.adapter, samples, self.system_prompt, self.instruction,
                                   where="verification pair")
        return VerificationBatch(batch, [pair.kind for pair in pairs])


def raw_pair_logits(backbone: nn.Module, adapter, batch: MatchBatch, yes_id: int, no_id: int) -> torch.Tensor:
    """Yes/No logits (samples, raw pairs, 2) of a packed matching batch on a bare backbone.

    Logits only at the answer positions and only from the two LM-head rows (never the whole
    vocabulary at every position)."""
    embeds, deepstack = adapter.embed_inputs(backbone, batch.input_ids, batch.pixel_values, batch.image_grid_thw)
    hidden = adapter.language_model(backbone, embeds, batch.block_mask[:, None], batch.position_ids,
                                    deepstack=deepstack)
    answers = hidden[batch.answer_rows, batch.answer_cols].view(batch.num_samples, batch.pairs_per_sample, -1)
    rows = adapter.output_rows(backbone, [yes_id, no_id])
    return answers[:, list(RAW_PAIRS)].to(rows.dtype) @ rows.T


def verification_loss(backbone: nn.Module, adapter, batch: VerificationBatch) -> dict[str, torch.Tensor]:
    """Cross-entropy of the raw pairs' Yes/No answers; ``count`` answers, ``matching_accuracy`` at argmax."""
    yes_id, no_id = adapter.token_id("Yes"), adapter.token_id("No")
    logits = raw_pair_logits(backbone, adapter, batch.match, yes_id, no_id).float().reshape(-1, 2)
    labels = batch.match.labels.view(batch.match.num_samples, -1)[:, list(RAW_PAIRS)].reshape(-1).to(logits.device)
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(dim=-1) == labels).float().mean().detach()
    return {"loss": loss, "count": torch.tensor(float(labels.numel()), device=logits.device),
            "matching_accuracy": accuracy}


@torch.inference_mode()
def verification_aucs(backbone: nn.Module, adapter, pairs: Sequence[VerificationPair], image_size: int,
                      system_prompt: str, instruction: str, batch_size: int = 32) -> dict[str, float]:
    """How well p("Yes") separates the true side from the foil, asked in the matching layout.

    ROC AUC of the true side's p("Yes") over the foil's, per foil kind and over all pairs
    (``all``) and over the foils that replace one attribute (``single_attribute``), each pair
    compared within itself (the mean of its raw answers on each side),
    so a model that does not read the difference scores 0.5 whatever its bias.
    """
    was_training = backbone.training
    backbone.eval()
    collate = VerificationCollator(adapter, image_size, system_prompt, instruction)
    yes_id, no_id = adapter.token_id("Yes"), adapter.token_id("No")
    true_side: dict[str, list[float]] = defaultdict(list)
    foil_side: dict[str, list[float]] = defaultdict(list)
    try:
        for start in range(0, len(pairs), batch_size):
            batch = collate(pairs[start:start + batch_size]).to(backbone.device)
            p_yes = torch.softmax(raw_pair_logits(backbone, adapter, batch.match, yes_id, no_id).float(), dim=-1)[..., 0]
            labels = batch.match.labels.view(batch.match.num_samples, -1)[:, list(RAW_PAIRS)].to(p_yes.device)
            for row, kind in enumerate(batch.kinds):
                for key in (kind, "all", *(("single_attribute",) if kind in SINGLE_ATTRIBUTE_FOILS else ())):
                    true_side[key].append(float(p_yes[row][labels[row] == 0].mean()))
                    foil_side[key].append(float(p_yes[row][labels[row] == 1].mean()))
    finally:
        backbone.train(was_training)
    return {kind: round(separation_auc(true_side[kind], foil_side[kind]), 4) for kind in sorted(true_side)}
