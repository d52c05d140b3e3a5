"""One training step's computation: embeddings, matching views, and the loss terms.

Everything a step computes happens inside :meth:`ReMatchTrainingModule.forward`, one call
per step, so DistributedDataParallel (which hooks into ``forward``) sees a single forward
before each backward, and DeepSpeed/FSDP wrap one module.

DDP (without ``find_unused_parameters``) needs every trainable parameter to get a gradient
on every rank at every step. Two kinds of parameters would not:

* parameters no enabled loss term can reach (the projector and an untied LM head when the
  matching loss is off, the zero-size token tensors when K = 0): they are frozen before DDP
  wraps the module (:func:`freeze_parameters_without_loss`), so they are not trained, not
  in the optimizer and not in checkpoints' trainable weights;
* parameters a particular step may not reach on a particular rank (the matching-only
  parameters when a rank's matching plan is empty, the vision tower when a rank's batch
  has no image): the step adds a zero-weighted term that touches them
  (:func:`zero_touch`), so every rank's graph reaches the same parameters. Their gradient
  from that rank is exactly zero, which is also their exact contribution to the global
  gradient (the losses are global means, see :mod:`rematch.losses`), so the result still
  equals one process on the global batch. This keeps DDP's static reducer (no graph
  search every step, as ``find_unused_parameters=True`` would do) and behaves the same in
  one process, under DDP and under GradCache (which averages gradients itself).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image
from torch import nn

from rematch.config import LossConfig
from rematch.data.items import Item, video_key
from rematch.losses import OBJECTIVE, LossWeights, ReMatchLoss
from rematch.matching import (MatchBatch, MatchSample, answer_states, build_packed_batch, build_reference_batch,
                              pair_kinds, training_views)
from rematch.model import EmbeddingOutput, ReMatchModel
from rematch.training.matching_diagnostics import matching_by_view
from rematch.training.vision_cache import with_image_features


@dataclass
class MatchingPlan:
    """Which samples of a batch are matched, against which document, in which slot order."""

    samples: list[MatchSample]
    soft_embeddings: torch.Tensor  # (len(samples) * 3, H): [query, document 0, document 1] per sample
    skipped: int  # samples without any usable negative


# ---------------------------------------------------------------------- which parameters a loss reaches


def matching_only_parameters(model: ReMatchModel) -> list[tuple[str, nn.Parameter]]:
    """Parameters only the matching branch uses: the projector and the LM head's output rows
    (when the head is not tied to the input embeddings, which every path uses)."""
    found = [(f"projector.{name}", p) for name, p in model.projector.named_parameters()]
    causal_lm = model.adapter.causal_lm(model.backbone)
    output = causal_lm.get_output_embeddings()
    input_weight = model.adapter.core(model.backbone).get_input_embeddings().weight
    if output is not None and output.weight is not input_weight:
        name = next((n for n, p in model.named_parameters() if p is output.weight), "lm_head.weight")
        found.append((name, output.weight))
    return found


def vision_parameters(model: ReMatchModel) -> list[nn.Parameter]:
    """The vision tower's parameters (LoRA adapters inside it included); empty if there is none."""
    visual = getattr(model.adapter.core(model.backbone), "visual", None)
    return list(visual.parameters()) if visual is not None else []


def freeze_parameters_without_loss(model: ReMatchModel, loss: LossConfig) -> list[str]:
    """Set ``requires_grad=False`` on parameters that no enabled loss term can reach; return their names.

    Call it before DDP wraps the model and before the optimizer is built: a trainable
    parameter that never gets a gradient breaks DDP's reducer ("Expected to have finished
    reduction in the prior iteration") and would sit in the optimizer and checkpoints for
    nothing. It only ever freezes; LoRA or ``freeze_vision`` decide the rest.
    """
    frozen: list[tuple[str, nn.Parameter]] = []
    if model.num_tokens == 0:  # zero-size token tensors: nothing to learn, nothing reaches them
        frozen += [("query_tokens", model.query_tokens), ("document_tokens", model.document_tokens)]
    if not loss.matching:
        frozen += matching_only_parameters(model)
    names = []
    for name, parameter in frozen:
        if parameter.requires_grad:
            parameter.requires_grad_(False)
            names.append(name)
    return names


def zero_touch(parameters: Iterable[nn.Parameter]) -> torch.Tensor | None:
    """A term whose value and gradient are zero but whose graph reaches every trainable given parameter.

    One element of each parameter times zero: cheap (no forward through the module), and
    the parameter's gradient becomes an exact zero tensor, so DDP's reducer sees it used.
    """
    pieces = [p.reshape(-1)[:1].float().sum() for p in parameters if p.requires_grad]
    return torch.stack(pieces).sum() * 0.0 if pieces else None


# ---------------------------------------------------------------------- same document, up to its spelling


def _strip_end_punctuation(text: str) -> str:
    start, stop = 0, len(text)
    while start < stop and (text[start].isspace() or unicodedata.category(text[start]).startswith("P")):
        start += 1
    while stop > start and (text[stop - 1].isspace() or unicodedata.category(text[stop - 1]).startswith("P")):
        stop -= 1
    return text[start:stop]


def document_identity(item: Item) -> tuple[str, str | None]:
    """What makes two documents the same document for the matching branch.

    The text up to case, runs of whitespace and punctuation at its ends ("Yes", "yes",
    " yes. " are one answer), and the same image (file path, or pixels for an in-memory
    image) or video. The instruction is left out: it says what to do with a document, not what the
    document is. Used so the in-batch fallback never takes a spelling variant of the
    positive as its negative.
    """
    text = _strip_end_punctuation(" ".join((item.text or "").casefold().split()))
    if item.video is not None:  # a video, like an image, by its file or its frames
        return text, repr(video_key(item.video))
    image = item.image
    if isinstance(image, Image.Image):
        image = f"pil:{image.mode}:{image.size}:{hashlib.sha1(image.tobytes()).hexdigest()}"
    elif image is not None:
        image = os.path.normcase(os.path.abspath(os.fspath(Path(image))))
    return text, image


# ---------------------------------------------------------------------- the step


class ReMatchTrainingModule(nn.Module):
    """Wraps a ReMatchModel with the ReMatch losses; ``forward(batch, step)`` returns the loss dict."""

    def __init__(self, model: ReMatchModel, loss: LossConfig, seed: int = 0, packed_matching: bool = True,
                 reuse_image_features: bool = True, reuse_processed_images: bool = True):
        super().__init__()
        self.packed_matching = packed_matching  # False: the pair-by-pair reference (benchmarks, tests)
        # The two False settings are the old path, kept for benchmarks and equivalence tests:
        # every pass runs the vision tower itself / the matching branch decodes its images again.
        self.reuse_image_features = reuse_image_features
        self.reuse_processed_images = reuse_processed_images
        self.model = model
        self.loss_config = loss
        # full: the answers' logits span the vocabulary and the targets are the Yes/No token ids
        self.answer_token_ids = ((model.yes_token_id, model.no_token_id) if loss.matching_vocabulary == "full"
                                 else None)
        self.criterion = ReMatchLoss(LossWeights(loss.contrastive, loss.orthogonality, loss.matching),
                                     temperature=loss.temperature, answer_token_ids=self.answer_token_ids)
        self.seed = seed
        self.last_skipped_matching = 0

    def forward(self, batch, step: int = 0) -> dict[str, torch.Tensor]:
        model = self.model
        batch = self.prepare_batch(batch)
        queries = model.embed(batch.queries, "query")
        positives = model.embed(batch.positives, "document")
        use_negatives = batch.negatives is not None and self.loss_config.hard_negatives
        negatives = model.embed(batch.negatives, "document") if use_negatives else None
        return self.losses(batch, queries, positives, negatives, step)

    def prepare_batch(self, batch):
        """The step's shared work, done once: the frozen tower's image features (every pass reuses
        them) and the matching views (when the collator did not make them in its threads)."""
        if not self.reuse_processed_images:
            batch = dataclasses.replace(batch, matching_views=None)
        elif self.loss_config.matching and batch.matching_views is None:
            batch = dataclasses.replace(batch, matching_views=training_views(
                self.model.adapter, batch.query_items, batch.queries, batch.positive_items, batch.positives,
                batch.negative_items, batch.negatives, batch.negative_owner))
        return with_image_features(self.model, batch) if self.reuse_image_features else batch

    def losses(self, batch, queries: EmbeddingOutput, positives: EmbeddingOutput,
               negatives: EmbeddingOutput | None, step: int = 0) -> dict[str, torch.Tensor]:
        """The loss terms from a batch's embeddings (GradCache passes cached leaf tensors here).

        With matching on, the dict also holds the matching loss and accuracy per kind of view
        pair (:mod:`rematch.training.matching_diagnostics`): measurements without a graph, not
        loss terms, never in ``"loss"``; the loop logs them as metrics."""
        model = self.model
        outputs = [queries, positives] + ([negatives] if negatives is not None else [])
        token_states = torch.cat([o.token_states for o in outputs]) if model.num_tokens > 1 else None
        embedded = [batch.queries, batch.positives] + ([batch.negatives] if negatives is not None else [])
        images_reached = any(b.pixel_values is not None or b.pixel_values_videos is not None for b in embedded)
        answer_logits = answer_labels = None
        kinds = pair_kinds(2)  # a query, its positive and one negative per matched sample
        matching_reached = False
        if self.loss_config.matching:
            if self.training:  # the projector's centre follows the batch's embeddings (rematch.layers)
                model.projector.observe(torch.cat([o.embedding for o in outputs]))
            plan = self.plan_matching(batch, queries, positives, negatives, step)
            self.last_skipped_matching = plan.skipped
            if plan.samples:
                build = build_packed_batch if self.packed_matching else build_reference_batch
                match_batch = build(model.adapter, plan.samples, model.config.system_prompt,
                                    model.config.matching_instruction, where="training sample")
                answer_logits = self.answer_logits(match_batch, plan.soft_embeddings, batch.image_features)
                answer_labels = match_batch.labels.to(answer_logits.device)
                kinds = pair_kinds(match_batch.num_documents)
                matching_reached = True
                images_reached = (images_reached or match_batch.pixel_values is not None
                                  or match_batch.pixel_values_videos is not None)
        terms = self.criterion(queries.embedding, positives.embedding,
                               negatives.embedding if negatives is not None else None,
                               token_states, answer_logits, answer_labels)
        if self.loss_config.matching:  # measurements, not loss terms (see matching_diagnostics)
            terms.update(matching_by_view(answer_logits, answer_labels, kinds, self.answer_token_ids,
                                          queries.embedding.device))
        unreached = [] if images_reached else vision_parameters(model)
        if self.loss_config.matching and not matching_reached:
            unreached += [p for _, p in matching_only_parameters(model)]
        touch = zero_touch(unreached)
        if touch is not None:
            for name in ("loss", OBJECTIVE):
                if name in terms:
                    terms[name] = terms[name] + touch
        return terms

    def answer_logits(self, match_batch: MatchBatch, soft_embeddings: torch.Tensor,
                      image_features=None) -> torch.Tensor:
        """The matching answers' logits (samples, pairs, 2 or V) for the configured loss: the
        [Yes, No] rows (``yes_no``) or the whole vocabulary (``full``), at the answer positions only."""
        model = self.model
        states = answer_states(model, match_batch, soft_embeddings, image_features=image_features)
        logits = model.vocabulary_logits(states) if self.answer_token_ids else model.answer_logits(states)
        return logits.view(match_batch.num_samples, match_batch.pairs_per_sample, -1)

    def plan_matching(self, batch, queries: EmbeddingOutput, positives: EmbeddingOutput,
                      negatives: EmbeddingOutput | None, step: int) -> MatchingPlan:
        """Pick the matched samples, their negative document and a random slot order.

        The negative is the row's own hard negative; for a row without one (and with
        ``in_batch_negatives``) the most similar other positive of this process's batch
        that is not the same document (:func:`document_identity`). d+ lands in slot 0 or 1
        at random so position cannot leak the label. ``matching_samples`` counts per process.
        """
        size = len(batch.query_items)
        limit = self.loss_config.matching_samples or size
        own_negative = {}
        for index, owner in enumerate(batch.negative_owner if negatives is not None else []):
            own_negative.setdefault(owner, index)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 101 + rank)
        similarity = (queries.embedding.detach() @ positives.embedding.detach().T).cpu()
        identities: list[tuple[str, str | None]] | None = None  # computed on the first fallback
        views = batch.matching_views  # the items' raw views, images already processed (None: load them)
        samples, rows, skipped = [], [], 0
        for i in range(size):
            if len(samples) == limit:
                break
            if i in own_negative:
                j = own_negative[i]
                negative_item, negative_embedding = batch.negative_items[j], negatives.embedding[j]
                negative_view = views.negatives[j] if views is not None else None
            elif self.loss_config.in_batch_negatives:
                if identities is None:
                    identities = [document_identity(item) for item in batch.positive_items]
                j = self._hardest_other_positive(identities, similarity[i], i)
                if j is None:
                    skipped += 1
                    continue
                negative_item, negative_embedding = batch.positive_items[j], positives.embedding[j]
                negative_view = views.positives[j] if views is not None else None
            else:
                skipped += 1
                continue
            positive_first = bool(torch.rand((), generator=generator) < 0.5)
            positive_view = views.positives[i] if views is not None else None
            pair = [(batch.positive_items[i], positives.embedding[i], True, positive_view),
                    (negative_item, negative_embedding, False, negative_view)]
            if not positive_first:
                pair.reverse()
            sample_views = (views.queries[i], pair[0][3], pair[1][3]) if views is not None else None
            samples.append(MatchSample(batch.query_items[i], (pair[0][0], pair[1][0]), (pair[0][2], pair[1][2]),
                                       views=sample_views))
            rows += [queries.embedding[i], pair[0][1], pair[1][1]]
        soft = torch.stack(rows) if rows else queries.embedding.new_zeros((0, queries.embedding.shape[1]))
        return MatchingPlan(samples, soft, skipped)

    @staticmethod
    def _hardest_other_positive(identities: Sequence[tuple[str, str | None]], similarities: torch.Tensor,
                                index: int) -> int | None:
        """The most similar positive that is a different document from positive ``index`` (None: none is)."""
        own = identities[index]
        for j in similarities.argsort(descending=True).tolist():
            if j != index and identities[j] != own:
                return j
        return None
