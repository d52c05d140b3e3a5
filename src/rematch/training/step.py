"""One training step's computation: embeddings, matching views, and the loss terms.

Everything a step computes happens inside :meth:`ReMatchTrainingModule.forward`, one call
per step, so DistributedDataParallel (which hooks into ``forward``) sees a single forward
before each backward, and DeepSpeed/FSDP wrap one module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rematch.config import LossConfig
from rematch.losses import LossWeights, ReMatchLoss
from rematch.matching import MatchSample, build_packed_batch, build_reference_batch, match_logits
from rematch.model import EmbeddingOutput, ReMatchModel


@dataclass
class MatchingPlan:
    """Which samples of a batch are matched, against which document, in which slot order."""

    samples: list[MatchSample]
    soft_embeddings: torch.Tensor  # (len(samples) * 3, H): [query, document 0, document 1] per sample
    skipped: int  # samples without any usable negative


class ReMatchTrainingModule(nn.Module):
    """Wraps a ReMatchModel with the ReMatch losses; ``forward(batch, step)`` returns the loss dict."""

    def __init__(self, model: ReMatchModel, loss: LossConfig, seed: int = 0, packed_matching: bool = True):
        super().__init__()
        self.packed_matching = packed_matching  # False: the pair-by-pair reference (benchmarks, tests)
        self.model = model
        self.loss_config = loss
        self.criterion = ReMatchLoss(LossWeights(loss.contrastive, loss.orthogonality, loss.matching),
                                     temperature=loss.temperature)
        self.seed = seed
        self.last_skipped_matching = 0

    def forward(self, batch, step: int = 0) -> dict[str, torch.Tensor]:
        model = self.model
        queries = model.embed(batch.queries, "query")
        positives = model.embed(batch.positives, "document")
        use_negatives = batch.negatives is not None and self.loss_config.hard_negatives
        negatives = model.embed(batch.negatives, "document") if use_negatives else None
        return self.losses(batch, queries, positives, negatives, step)

    def losses(self, batch, queries: EmbeddingOutput, positives: EmbeddingOutput,
               negatives: EmbeddingOutput | None, step: int = 0) -> dict[str, torch.Tensor]:
        """The loss terms from a batch's embeddings (GradCache passes cached leaf tensors here)."""
        model = self.model
        outputs = [queries, positives] + ([negatives] if negatives is not None else [])
        token_states = torch.cat([o.token_states for o in outputs]) if model.num_tokens > 1 else None
        answer_logits = answer_labels = None
        if self.loss_config.matching:
            plan = self.plan_matching(batch, queries, positives, negatives, step)
            self.last_skipped_matching = plan.skipped
            if plan.samples:
                build = build_packed_batch if self.packed_matching else build_reference_batch
                match_batch = build(model.adapter, plan.samples, model.config.system_prompt,
                                    model.config.matching_instruction, where="training sample")
                answer_logits = match_logits(model, match_batch, plan.soft_embeddings)
                answer_labels = match_batch.labels.to(answer_logits.device)
        return self.criterion(queries.embedding, positives.embedding,
                              negatives.embedding if negatives is not None else None,
                              token_states, answer_logits, answer_labels)

    def plan_matching(self, batch, queries: EmbeddingOutput, positives: EmbeddingOutput,
                      negatives: EmbeddingOutput | None, step: int) -> MatchingPlan:
        """Pick the matched samples, their negative document and a random slot order.

        The negative is the row's own hard negative; for a row without one (and with
        ``in_batch_negatives``) the most similar other positive of the batch that is not
        the same item. d+ lands in slot 0 or 1 at random so position cannot leak the label.
        """
        size = len(batch.query_items)
        limit = self.loss_config.matching_samples or size
        own_negative = {}
        for index, owner in enumerate(batch.negative_owner if negatives is not None else []):
            own_negative.setdefault(owner, index)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 101 + rank)
        similarity = (queries.embedding.detach() @ positives.embedding.detach().T).cpu()
        samples, rows, skipped = [], [], 0
        for i in range(size):
            if len(samples) == limit:
                break
            if i in own_negative:
                j = own_negative[i]
                negative_item, negative_embedding = batch.negative_items[j], negatives.embedding[j]
            elif self.loss_config.in_batch_negatives:
                j = self._hardest_other_positive(batch, similarity[i], i)
                if j is None:
                    skipped += 1
                    continue
                negative_item, negative_embedding = batch.positive_items[j], positives.embedding[j]
            else:
                skipped += 1
                continue
            positive_first = bool(torch.rand((), generator=generator) < 0.5)
            pair = [(batch.positive_items[i], positives.embedding[i], True),
                    (negative_item, negative_embedding, False)]
            if not positive_first:
                pair.reverse()
            samples.append(MatchSample(batch.query_items[i], (pair[0][0], pair[1][0]), (pair[0][2], pair[1][2])))
            rows += [queries.embedding[i], pair[0][1], pair[1][1]]
        soft = torch.stack(rows) if rows else queries.embedding.new_zeros((0, queries.embedding.shape[1]))
        return MatchingPlan(samples, soft, skipped)

    @staticmethod
    def _hardest_other_positive(batch, similarities: torch.Tensor, index: int) -> int | None:
        own_key = batch.positive_items[index].cache_key()
        for j in similarities.argsort(descending=True).tolist():
            if j != index and batch.positive_items[j].cache_key() != own_key:
                return j
        return None
