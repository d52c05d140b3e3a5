"""Does a pre-trained backbone verify captions when asked the way ReMatch's matching head asks?

    python scripts/probe_matching_verification.py [--model tiny-pretrained|RUN/model] [--scenes 100]

Why: pre-training asks "Does this caption describe the image? {caption}" in one plain causal
sequence, so every caption token reads the image before it. The matching head asks in the
packed layout of :mod:`rematch.matching`: the query (here the image) and the document (here
the caption) are blocks that see only the prompt and themselves, and only the answer tokens
see both. Reranking and the matching loss start from what the backbone does in that layout,
so this probe scores the ``heldout`` split's verification captions there: p("Yes") of the
(raw query, raw document) pair, the way :func:`rematch.retrieval.rerank.matching_probabilities`
computes it with ``views="raw"`` (no projector or soft token is involved, so the ReMatch
parts around the backbone are untrained and do not matter). It prints the accuracies at 0.5
and the separation of true captions from foils (ROC AUC, 0.5 = none).

Measured 2026-11-28 (docs/pretraining.md, 100 + 100 captions): AUC 0.57 for the shipped
``tiny-pretrained`` (0.475 in pre-training's own prompt, 200 + 200): neither layout separates
true captions from foils.
"""

from __future__ import annotations

import argparse
import json

import torch

from rematch import ReMatchModel
from rematch.backbones.pretrained_tiny import PRETRAINED_TINY
from rematch.data.items import Item
from rematch.retrieval.rerank import matching_probabilities
from rematch.training.answers import ExampleScores
from rematch.world.pretrain_corpus import VERIFY_PROMPT, Example, heldout_examples


def caption_of(example: Example) -> str:
    """The caption a verification example asks about (the prompt is VERIFY_PROMPT around it)."""
    before, after = VERIFY_PROMPT.split("{caption}")
    if not (example.prompt.startswith(before) and example.prompt.endswith(after)):
        raise ValueError(f"not a verification prompt: {example.prompt!r}")
    return example.prompt[len(before):len(example.prompt) - len(after)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=PRETRAINED_TINY, help="tiny-pretrained or a pre-training run's model directory")
    parser.add_argument("--scenes", type=int, default=100, help="true captions and foils, this many of each")
    parser.add_argument("--image-size", type=int, default=112, help="side of the rendered scenes (the model's own)")
    parser.add_argument("--instruction", default=None, help="the matching instruction (default: the model config's)")
    args = parser.parse_args()

    torch.manual_seed(0)
    fields = {"matching_instruction": args.instruction} if args.instruction else {}
    model = (ReMatchModel.tiny(pretrained=True, **fields) if args.model == PRETRAINED_TINY
             else ReMatchModel.from_backbone(args.model, **fields))
    scores = ExampleScores()  # scored as `rematch eval generative` scores its own prompt
    for example in (e for e in heldout_examples(args.scenes) if e.task == "verify"):
        p_yes = float(matching_probabilities(model, Item(image=example.image(args.image_size)),
                                             [Item(text=caption_of(example))], views="raw")[0])
        key = "verify/true" if example.kind == "true" else "verify/foil"
        scores.correct[key].append((p_yes > 0.5) == (example.answer == "Yes"))
        scores.yes_probability[key].append(p_yes)
    print(json.dumps({
        "model": args.model,
        "captions": {"true": len(scores.correct["verify/true"]), "foils": len(scores.correct["verify/foil"])},
        "true_captions_yes": scores.accuracy("verify/true"),
        "foils_no": scores.accuracy("verify/foil"),
        "mean_yes_probability": {"true_captions": scores.mean_yes_probability("verify/true"),
                                 "foils": scores.mean_yes_probability("verify/foil")},
        "separation_auc": scores.verification_auc(),
    }, indent=2))


if __name__ == "__main__":
    main()
