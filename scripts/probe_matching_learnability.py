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

import torch
from torch.nn import functional as F

from rematch.data.items import Item
from rematch.matching import MatchSample, build_packed_batch, match_logits, pair_kinds
from rematch.model import ReMatchModel
from rematch.training.answers import separation_auc

TASKS = ("document-only", "soft-equality", "text-equality")
WORDS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "star", "square", "circle",
         "triangle", "small", "large", "left", "right")
NUM_DOCUMENTS = 2  # a relevant and an irrelevant document per sample, in random slots (as in training)


@dataclass
class Pairs:
    """A batch of synthetic samples and their soft-token table (query, document 0, document 1 per sample)."""

    samples: list[MatchSample]
    soft: torch.Tensor


def near_duplicate(vector: torch.Tensor, cosine: float, rng: random.Random) -> torch.Tensor:
    """A unit vector at ``cosine`` to ``vector``: a hard negative, as a compositional foil's
    embedding is to its true caption's (0.95-0.99 in the demo's training rows)."""
    noise = torch.randn(vector.shape[-1], generator=torch.Generator().manual_seed(rng.randrange(2 ** 31)))
    noise = F.normalize(noise - (noise @ vector) * vector, dim=-1)
    return cosine * vector + (1 - cosine ** 2) ** 0.5 * noise


def make_pairs(task: str, identities: torch.Tensor, count: int, rng: random.Random,
               negative_cosine: float | None = None) -> Pairs:
    """``count`` samples of ``task`` (see the module docstring), each with one relevant document.
    ``negative_cosine`` (soft-equality): the irrelevant document's soft vector is a near
    duplicate of the query's at this cosine instead of another identity."""
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
        documents = [identities[chosen[0]], identities[chosen[1]]]
        if task == "soft-equality" and negative_cosine is not None:
            documents[1] = near_duplicate(identities[i], negative_cosine, rng)
        soft += [identities[i], *(documents[k] for k in order)]
    return Pairs(samples, torch.stack(soft))


def answer_logits(model: ReMatchModel, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Yes/No logits (samples, pairs, 2) and labels (samples, pairs; 0 = Yes) of the packed forward."""
    config = model.config
    batch = build_packed_batch(model.adapter, pairs.samples, config.system_prompt, config.matching_instruction)
    return match_logits(model, batch, pairs.soft), batch.labels.view(len(pairs.samples), -1)


def auc_per_view(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    p_yes = torch.softmax(logits.float(), dim=-1)[..., 0]
    kinds = pair_kinds(NUM_DOCUMENTS)
    result = {}
    for kind in sorted(set(kinds)):
        columns = [c for c, k in enumerate(kinds) if k == kind]
        values, truth = p_yes[:, columns].flatten(), labels[:, columns].flatten() == 0
        result[kind] = round(separation_auc(values[truth].tolist(), values[~truth].tolist()), 3)
    return result


def identity_table(count: int, hidden: int, shared_cosine: float, seed: int) -> torch.Tensor:
    """``count`` unit vectors whose mean pairwise cosine is about ``shared_cosine``: a common
    direction mixed into random ones, as trained embeddings share one (the demo's documents:
    0.67-0.98), where 0 gives the isotropic identities of the first probes."""
    if not 0.0 <= shared_cosine < 1.0:
        raise ValueError(f"shared_cosine must be in [0, 1), got {shared_cosine}")
    generator = torch.Generator().manual_seed(seed)
    random_part = F.normalize(torch.randn(count, hidden, generator=generator), dim=-1)
    common = F.normalize(torch.randn(1, hidden, generator=generator), dim=-1)
    return F.normalize(shared_cosine ** 0.5 * common + (1 - shared_cosine) ** 0.5 * random_part, dim=-1)


def train_probe(task: str, steps: int, *, identities: int = 8, batch_size: int = 16, lr: float = 1e-3,
                backbone: str = "tiny-pretrained", seed: int = 0, eval_every: int = 50, heldout: int = 64,
                shared_cosine: float = 0.0, negative_cosine: float | None = None, easy_steps: int = 0,
                log=print) -> list[dict]:
    """Train the matching branch alone on ``task``; returns (and logs) one record per evaluation."""
    torch.manual_seed(seed)
    model = ReMatchModel.tiny(pretrained=backbone == "tiny-pretrained", num_tokens=4, seed=seed)
    model.train()
    table = identity_table(identities, model.hidden_size, shared_cosine, seed)
    held_out = make_pairs(task, table, heldout, random.Random(10_000 + seed), negative_cosine)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    records, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        hard = negative_cosine if step > easy_steps else None  # a curriculum: other identities first
        pairs = make_pairs(task, table, batch_size, rng, hard)
        model.projector.observe(pairs.soft)  # as the training step does with its batch's embeddings
        logits, labels = answer_logits(model, pairs)
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
    parser.add_argument("--shared-cosine", type=float, default=0.0,
                        help="mean pairwise cosine of the soft identities (a shared direction, as trained "
                             "embeddings have; 0: isotropic)")
    parser.add_argument("--negative-cosine", type=float, default=None,
                        help="soft-equality: the irrelevant document is a near duplicate of the query at this "
                             "cosine (a hard negative) instead of another identity")
    parser.add_argument("--easy-steps", type=int, default=0,
                        help="with --negative-cosine: the first N steps take another identity as the irrelevant "
                             "document (easy), the rest the near duplicate")
    parser.add_argument("--eval-every", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_probe(args.task, args.steps, identities=args.identities, batch_size=args.batch_size, lr=args.lr,
                backbone=args.backbone, seed=args.seed, eval_every=args.eval_every, shared_cosine=args.shared_cosine,
                negative_cosine=args.negative_cosine, easy_steps=args.easy_steps)


if __name__ == "__main__":
    main()
