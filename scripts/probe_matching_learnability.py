"""Can the packed matching branch learn what it is asked? Synthetic pairs whose answer is known.

    python scripts/probe_matching_learnability.py --task document-only|soft-equality|text-equality
        [--steps 400] [--identities 8] [--backbone tiny-pretrained|tiny] [--seed 0]

Why (issue 24): in the demo the matching loss sits at ln 2 on every view pair. Before
blaming the curriculum, this separates "the branch cannot see or read what it needs" (a
defect: soft tokens injected at the wrong place, a mask hiding the document, logits read
from the wrong state, no gradient reaching the projector or the answer rows) from "the
branch can, but the task is hard". It trains the real packed matching forward of
:mod:`rematch.matching` on a tiny ReMatch model, with text-only views and soft tokens taken
from a fixed table of random unit vectors ("identities") instead of the model's embeddings:

* ``document-only``: a pair is relevant when the document's soft identity is one of the
  first half. First order: the answer is a function of one view, so the soft-document pairs
  must reach AUC ~1.0 quickly, and pairs with a raw document (identical text for every
  document) must stay at 0.5: that checks injection, masking and the gradient path.
* ``soft-equality``: relevant when query and document carry the same identity. A comparison
  of two soft tokens, as the soft-soft pair of real training (where the first stage has
  already aligned the two embeddings).
* ``text-equality``: query and document are words, relevant when equal (the soft tokens carry
  the matching identities too): a comparison of two raw views.

Each evaluation prints one JSON line: the step, the training loss and the held-out ROC AUC of
p("Yes") per view pair kind (query view - document view).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from rematch.data.items import Item
from rematch.matching import QUERY_VIEWS, MatchSample, build_packed_batch, document_blocks, match_logits, view_pairs
from rematch.model import ReMatchModel

TASKS = ("document-only", "soft-equality", "text-equality")
WORDS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "star", "square", "circle",
         "triangle", "small", "large", "left", "right")
NUM_DOCUMENTS = 2  # a relevant and an irrelevant document per sample, in random slots (as in training)


@dataclass
class Pairs:
    """A batch of synthetic samples and their soft-token table (query, document 0, document 1 per sample)."""

    samples: list[MatchSample]
    soft: torch.Tensor


def pair_kinds() -> list[str]:
    """``raw-soft`` etc. for each answer of a sample, in the packed batch's answer order."""
    raw_documents = {document_blocks(j)[0] for j in range(NUM_DOCUMENTS)}
    return [f"{'raw' if query == QUERY_VIEWS[0] else 'soft'}-{'raw' if document in raw_documents else 'soft'}"
            for query, document in view_pairs(NUM_DOCUMENTS)]


def make_pairs(task: str, identities: torch.Tensor, count: int, rng: random.Random) -> Pairs:
    """``count`` samples of ``task`` (see the module docstring), each with one relevant document."""
    n = len(identities)
    samples, soft = [], []
    for _ in range(count):
        i = rng.randrange(n)
        j = rng.choice([k for k in range(n) if k != i])
        if task == "document-only":
            chosen = (rng.randrange(n // 2), n // 2 + rng.randrange(n // 2))
            query_text, document_texts = "query", ("document", "document")
        elif task == "soft-equality":
            chosen = (i, j)
            query_text, document_texts = "query", ("document", "document")
        elif task == "text-equality":
            chosen = (i, j)
            query_text, document_texts = WORDS[i], (WORDS[i], WORDS[j])
        else:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        order = (0, 1) if rng.random() < 0.5 else (1, 0)
        samples.append(MatchSample(Item(text=query_text), tuple(Item(text=document_texts[k]) for k in order),
                                   tuple(k == 0 for k in order)))
        soft += [identities[i], *(identities[chosen[k]] for k in order)]
    return Pairs(samples, torch.stack(soft))


def answer_logits(model: ReMatchModel, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Yes/No logits (samples, pairs, 2) and labels (samples, pairs; 0 = Yes) of the packed forward."""
    config = model.config
    batch = build_packed_batch(model.adapter, pairs.samples, config.system_prompt, config.matching_instruction)
    return match_logits(model, batch, pairs.soft), batch.labels.view(len(pairs.samples), -1)


def separation_auc(positives: list[float], negatives: list[float]) -> float:
    """ROC AUC of positives over negatives, ties counted half (0.5: no separation)."""
    pos, neg = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def auc_per_view(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    p_yes = torch.softmax(logits.float(), dim=-1)[..., 0]
    kinds = pair_kinds()
    result = {}
    for kind in sorted(set(kinds)):
        columns = [c for c, k in enumerate(kinds) if k == kind]
        values, truth = p_yes[:, columns].flatten(), labels[:, columns].flatten() == 0
        result[kind] = round(separation_auc(values[truth].tolist(), values[~truth].tolist()), 3)
    return result


def train_probe(task: str, steps: int, *, identities: int = 8, batch_size: int = 16, lr: float = 1e-3,
                backbone: str = "tiny-pretrained", seed: int = 0, eval_every: int = 50, heldout: int = 64,
                log=print) -> list[dict]:
    """Train the matching branch alone on ``task``; returns (and logs) one record per evaluation."""
    torch.manual_seed(seed)
    model = ReMatchModel.tiny(pretrained=backbone == "tiny-pretrained", num_tokens=4, seed=seed)
    model.train()
    table = F.normalize(torch.randn(identities, model.hidden_size, generator=torch.Generator().manual_seed(seed)),
                        dim=-1)
    held_out = make_pairs(task, table, heldout, random.Random(10_000 + seed))
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    records, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        logits, labels = answer_logits(model, make_pairs(task, table, batch_size, rng))
        loss = F.cross_entropy(logits.reshape(-1, 2).float(), labels.reshape(-1).to(logits.device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                record = {"step": step, "loss": round(loss.item(), 4), "auc": auc_per_view(*answer_logits(model, held_out)),
                          "seconds": round(time.perf_counter() - start, 1)}
            model.train()
            records.append(record)
            log(json.dumps(record))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default="document-only")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--identities", type=int, default=8, help="distinct identities (words / soft vectors)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backbone", choices=("tiny-pretrained", "tiny"), default="tiny-pretrained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_probe(args.task, args.steps, identities=args.identities, batch_size=args.batch_size, lr=args.lr,
                backbone=args.backbone, seed=args.seed, eval_every=args.eval_every)


if __name__ == "__main__":
    main()
