"""The "answers" objective of pre-training: prompts with answers as batches, the answer-only loss,
Yes/No scores from two LM-head rows, and greedy decoding.

Pre-training (:mod:`rematch.training.pretrain`) and ``rematch eval generative`` share these,
so the model is measured on exactly the sequences it was trained on. Every sequence is the
backbone adapter's own chat format (the one ReMatch's embedding and matching branches use)::

    <|im_start|>system\\n{system prompt}<|im_end|>\\n<|im_start|>user\\n<image>{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>

Batches are left-padded, so every row's answer ends the row: the answer positions are a
slice at the end, and appending a decoded token appends one column.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rematch.backbones.qwen_vl import mrope_positions
from rematch.data.items import Item

END_OF_TURN = "<|im_end|>"


@dataclass
class AnswerBatch:
    """Left-padded prompts (+ answers): the backbone's inputs and where the answers are."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (3, B, L)
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    answer_lengths: list[int]  # tokens at the end of each row that are the answer (0: prompt only)

    def to(self, device: torch.device | str) -> "AnswerBatch":
        move = (lambda t: None if t is None else t.to(device))
        return AnswerBatch(move(self.input_ids), move(self.attention_mask), move(self.position_ids),
                               move(self.pixel_values), move(self.image_grid_thw), list(self.answer_lengths))


class AnswerCollator:
    """(image, prompt, answer) triples -> :class:`AnswerBatch`, with the adapter's processor."""

    def __init__(self, adapter, image_size: int):
        self.adapter = adapter
        self.image_size = image_size

    def __call__(self, examples: Sequence, with_answers: bool = True) -> AnswerBatch:
        """``examples`` have ``image(side)``, ``text`` (the user turn, with its image mark
        where the image goes) and ``answer`` (see :class:`rematch.world.pretrain_corpus.Example`)."""
        adapter = self.adapter
        texts, images, answer_lengths = [], [], []
        for index, example in enumerate(examples):
            image = adapter.load_image(example.image(self.image_size), f"example {index}")
            item = Item(text=example.text, image=image)
            adapter.check_user_text(item, f"example {index}")
            images.append(image)
            prompt = adapter.format_item(item, 0)
            if with_answers:
                answer = example.answer + END_OF_TURN
                answer_lengths.append(len(adapter.tokenizer(answer, add_special_tokens=False)["input_ids"]))
                prompt += answer
            else:
                answer_lengths.append(0)
            texts.append(prompt)
        with adapter._processor_lock:
            encoded = adapter.processor(text=texts, images=images, padding=True, padding_side="left",
                                        return_tensors="pt", return_mm_token_type_ids=True)
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        grids = encoded["image_grid_thw"]
        position_ids = torch.zeros((3, *input_ids.shape), dtype=torch.long)
        for row in range(len(examples)):
            valid = attention_mask[row].bool()
            positions, _ = mrope_positions(encoded["mm_token_type_ids"][row][valid].tolist(), [grids[row].tolist()],
                                           adapter.spatial_merge)
            position_ids[:, row, valid] = positions
        if with_answers:  # the answer tokenised alone must be what ends the row (no merge across the boundary)
            for row, length in enumerate(answer_lengths):
                tail = adapter.tokenizer.decode(input_ids[row, -length:])
                if tail != examples[row].answer + END_OF_TURN:
                    raise ValueError(f"example {row}: answer {examples[row].answer!r} does not tokenise on its own "
                                     f"at the end of the sequence (got {tail!r})")
        return AnswerBatch(input_ids, attention_mask, position_ids, encoded.get("pixel_values"), grids,
                               answer_lengths)


def final_states(backbone: nn.Module, adapter, batch: AnswerBatch) -> torch.Tensor:
    """The language model's final (normed) hidden states (B, L, H)."""
    embeds, deepstack = adapter.embed_inputs(backbone, batch.input_ids, batch.pixel_values, batch.image_grid_thw)
    return adapter.language_model(backbone, embeds, batch.attention_mask, batch.position_ids, deepstack=deepstack)


def answer_loss(backbone: nn.Module, adapter, batch: AnswerBatch) -> dict[str, torch.Tensor]:
    """Mean next-token cross-entropy over the answer tokens only (prompts and images are context),
    and ``count``, how many tokens it averages (what a global mean over processes weighs by).

    Logits are computed only at the positions that predict an answer token, not for the
    whole sequence.
    """
    hidden = final_states(backbone, adapter, batch)
    length = hidden.shape[1]
    rows, columns = [], []
    for row, answer in enumerate(batch.answer_lengths):
        if answer < 1:
            raise ValueError(f"row {row} has no answer tokens to learn from")
        rows += [row] * answer
        columns += range(length - answer - 1, length - 1)  # the state before each answer token predicts it
    rows_t = torch.tensor(rows, device=hidden.device)
    columns_t = torch.tensor(columns, device=hidden.device)
    states = hidden[rows_t, columns_t]
    weight = adapter.causal_lm(backbone).get_output_embeddings().weight
    logits = states.to(weight.dtype) @ weight.T
    targets = batch.input_ids[rows_t, columns_t + 1]
    loss = F.cross_entropy(logits.float(), targets)
    return {"loss": loss, "count": torch.tensor(float(len(rows)), device=hidden.device)}


@torch.inference_mode()
def yes_no_logits(backbone: nn.Module, adapter, batch: AnswerBatch, yes_id: int, no_id: int) -> torch.Tensor:
    """(B, 2) logits of ["Yes", "No"] as the first answer token, from just those two LM-head rows."""
    hidden = final_states(backbone, adapter, batch)[:, -1]
    rows = adapter.output_rows(backbone, [yes_id, no_id])
    return hidden.to(rows.dtype) @ rows.T


@torch.inference_mode()
def greedy_answers(backbone: nn.Module, adapter, batch: AnswerBatch, max_new_tokens: int = 8) -> list[str]:
    """Greedy decoding until ``<|im_end|>`` (or ``max_new_tokens``); returns the decoded answers.

    Each new token is one more column of the left-padded batch, a text token whose three
    M-RoPE ids follow the row's last position. The whole sequence is recomputed per token
    (no KV cache): answers are a few tokens and the models this serves are tiny.
    """
    end = adapter.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    weight = adapter.causal_lm(backbone).get_output_embeddings().weight
    input_ids, mask, positions = batch.input_ids, batch.attention_mask, batch.position_ids
    generated = [[] for _ in range(input_ids.shape[0])]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        step = AnswerBatch(input_ids, mask, positions, batch.pixel_values, batch.image_grid_thw, [])
        hidden = final_states(backbone, adapter, step)[:, -1]
        token = (hidden.to(weight.dtype) @ weight.T).argmax(dim=-1)
        token = torch.where(finished, torch.full_like(token, end), token)
        for row, value in enumerate(token.tolist()):
            if not finished[row] and value != end:
                generated[row].append(value)
        finished |= token == end
        if bool(finished.all()):
            break
        input_ids = torch.cat([input_ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, :, -1:] + 1], dim=2)
    return [adapter.tokenizer.decode(tokens) for tokens in generated]


@dataclass
class ExampleScores:
    """Right/wrong per example, keyed by question type, ``verify/true``, ``verify/foil`` and
    ``foil/<kind>``, with a few decoded answers per question type to read."""

    correct: dict[str, list[bool]] = field(default_factory=lambda: defaultdict(list))
    samples: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))
    yes_probability: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    """p("Yes") of each verification (softmax over the "Yes"/"No" rows), under ``verify/true``
    and ``verify/foil``: what the accuracies threshold at 0.5."""

    def accuracy(self, key: str) -> float | None:
        return _rounded_mean(self.correct.get(key, []))

    def balanced_verification(self) -> float | None:
        """(true captions + foils) / 2: 0.5 for a model that always says "Yes" (or "No")."""
        true, foils = self.accuracy("verify/true"), self.accuracy("verify/foil")
        return None if true is None or foils is None else round((true + foils) / 2, 4)

    def verification_auc(self) -> float | None:
        """How often a true caption gets a higher p("Yes") than a foil (ties count half).

        Accuracies at a 0.5 threshold can look like a biased verifier that works (87% of true
        captions, 16% of foils) while p("Yes") is 0.505 for every caption; this does not
        depend on a threshold: 0.5 is no separation at all, 1.0 a perfect one."""
        true, foils = self.yes_probability.get("verify/true"), self.yes_probability.get("verify/foil")
        return None if not true or not foils else round(separation_auc(true, foils), 4)

    def mean_yes_probability(self, key: str) -> float | None:
        return _rounded_mean(self.yes_probability.get(key, []))


def _rounded_mean(values: Sequence[float]) -> float | None:
    """The mean to four places (None for no values): how every score of this module is reported."""
    return round(sum(values) / len(values), 4) if values else None


def separation_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """The area under the ROC curve of scores that should rank ``positives`` above ``negatives``:
    the share of (positive, negative) pairs ordered right, a tie counting half (Mann-Whitney U).

    Computed from the ranks of the pooled scores (ties share their mean rank), never pair by
    pair, so a pooled evaluation (every query's positive against every reranked negative of a
    subset) costs a sort, not a positives x negatives table."""
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("separation_auc needs at least one positive and one negative score")
    high = np.asarray(positives, dtype=np.float64).reshape(-1)
    pooled = np.concatenate([high, np.asarray(negatives, dtype=np.float64).reshape(-1)])
    _, inverse, counts = np.unique(pooled, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based; a tie's ranks averaged
    rank_sum = float(mean_rank[inverse[:len(high)]].sum())
    low_count = len(pooled) - len(high)
    return (rank_sum - len(high) * (len(high) + 1) / 2) / (len(high) * low_count)


def score_examples(backbone: nn.Module, adapter, examples: Sequence, image_size: int, batch_size: int = 64,
                   samples_per_task: int = 0) -> ExampleScores:
    """Score corpus examples (:class:`rematch.world.pretrain_corpus.Example`) the way the
    generative evaluation reports them: questions by greedy decoding and exact match after
    normalisation, verification by the "Yes"/"No" LM-head rows at the first answer position.

    Pre-training's held-out log and ``rematch eval generative`` both call this, so the
    accuracy a run logs is the accuracy the evaluation reports.
    """
    from rematch.world.pretrain_corpus import normalise_answer

    collate = AnswerCollator(adapter, image_size)
    yes_id, no_id = adapter.token_id("Yes"), adapter.token_id("No")
    scores = ExampleScores()
    was_training = backbone.training
    backbone.eval()
    try:
        questions = [e for e in examples if e.task != "verify"]
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            batch = collate(chunk, with_answers=False).to(backbone.device)
            for example, answer in zip(chunk, greedy_answers(backbone, adapter, batch)):
                scores.correct[example.task].append(normalise_answer(answer) == normalise_answer(example.answer))
                if len(scores.samples[example.task]) < samples_per_task:
                    scores.samples[example.task].append({"prompt": example.prompt, "answer": example.answer,
                                                         "generated": answer})
        verifications = [e for e in examples if e.task == "verify"]
        for start in range(0, len(verifications), batch_size):
            chunk = verifications[start:start + batch_size]
            logits = yes_no_logits(backbone, adapter, collate(chunk, with_answers=False).to(backbone.device),
                                   yes_id, no_id)
            if not torch.isfinite(logits).all():
                raise FloatingPointError("non-finite Yes/No logits: the model's weights are damaged")
            yes_probabilities = torch.softmax(logits.double(), dim=-1)[:, 0].tolist()
            for example, says_yes, yes_probability in zip(chunk, (logits[:, 0] > logits[:, 1]).tolist(),
                                                          yes_probabilities):
                right = says_yes == (example.answer == "Yes")
                key = "verify/true" if example.kind == "true" else "verify/foil"
                scores.correct[key].append(right)
                scores.yes_probability[key].append(yes_probability)
                if example.kind != "true":
                    scores.correct[f"foil/{example.kind}"].append(right)
    finally:
        backbone.train(was_training)
    return scores
