"""The backbone as an MLLM: does it answer questions about held-out scenes, and can it tell a
true caption from a compositional foil?

Examples come from the corpus's ``heldout`` split (:mod:`rematch.world.pretrain_corpus`),
whose scenes lie in the other half of all layouts than pre-training's, so none was seen in
training. Short answers are decoded greedily and compared after normalisation (exact
match); verification reads the two LM-head rows of "Yes" and "No" at the first answer
position, the score ReMatch's matching head uses, and is reported on true captions and on
foils separately (and per foil kind), since a model that always says "Yes" gets 50% on a
balanced mix and 0% on foils.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rematch.training.generative import GenerativeCollator, greedy_answers, yes_no_logits
from rematch.world.pretrain_corpus import (
    ANSWERS,
    FOIL_KINDS,
    GENERATOR_VERSION,
    QUESTION_TYPES,
    CorpusSpec,
    Example,
    make_example,
    normalise_answer,
)

#: Chance accuracy of each question type: one over the answers a question allows (a position
#: question names its two options, "left or right" / "top or bottom").
CHANCE = {**{task: 1 / len(ANSWERS[task]) for task in QUESTION_TYPES}, "position": 0.5}


@dataclass
class GenerativeModel:
    """A backbone with its adapter and the image size it was trained at."""

    backbone: Any
    adapter: Any
    image_size: int
    source: str


def heldout_examples(per_type: int, seed: int = 0) -> list[Example]:
    """``per_type`` examples of every question type, ``per_type`` true captions and
    ``per_type`` foils to verify, from the ``heldout`` stream (in stream order)."""
    if per_type < 1:
        raise ValueError(f"the number of held-out examples per type must be >= 1, got {per_type}")
    wanted = {**{task: per_type for task in QUESTION_TYPES}, "verify/true": per_type, "verify/foil": per_type}
    spec = CorpusSpec(split="heldout", seed=seed, task_weights={task: 1.0 for task in (*QUESTION_TYPES, "verify")})
    chosen, index = [], 0
    while any(wanted.values()):
        example = make_example(spec, index)
        index += 1
        key = example.task if example.task != "verify" else f"verify/{'true' if example.kind == 'true' else 'foil'}"
        if wanted.get(key, 0) > 0:
            wanted[key] -= 1
            chosen.append(example)
    return chosen


def evaluate_generative(model: GenerativeModel, per_type: int = 200, seed: int = 0,
                        batch_size: int = 64) -> dict[str, Any]:
    """Accuracy per question type and verification accuracy (true captions, foils, per foil kind)."""
    import torch

    examples = heldout_examples(per_type, seed)
    collate = GenerativeCollator(model.adapter, model.image_size)
    backbone, adapter = model.backbone, model.adapter
    yes_id, no_id = adapter.token_id("Yes"), adapter.token_id("No")
    was_training = backbone.training
    backbone.eval()
    correct: dict[str, list[bool]] = defaultdict(list)
    samples: dict[str, list[dict]] = defaultdict(list)
    try:
        questions = [e for e in examples if e.task != "verify"]
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            batch = collate(chunk, with_answers=False).to(backbone.device)
            for example, answer in zip(chunk, greedy_answers(backbone, adapter, batch)):
                right = normalise_answer(answer) == normalise_answer(example.answer)
                correct[example.task].append(right)
                if len(samples[example.task]) < 3:
                    samples[example.task].append({"prompt": example.prompt, "answer": example.answer,
                                                  "generated": answer})
        verifications = [e for e in examples if e.task == "verify"]
        for start in range(0, len(verifications), batch_size):
            chunk = verifications[start:start + batch_size]
            logits = yes_no_logits(backbone, adapter, collate(chunk, with_answers=False).to(backbone.device),
                                   yes_id, no_id)
            if not torch.isfinite(logits).all():
                raise FloatingPointError("non-finite Yes/No logits: the model's weights are damaged")
            for example, says_yes in zip(chunk, (logits[:, 0] > logits[:, 1]).tolist()):
                right = says_yes == (example.answer == "Yes")
                correct["verify/true" if example.kind == "true" else "verify/foil"].append(right)
                if example.kind != "true":
                    correct[f"foil/{example.kind}"].append(right)
    finally:
        backbone.train(was_training)

    def accuracy(key: str) -> dict[str, float | int]:
        values = correct.get(key, [])
        return {"accuracy": round(sum(values) / len(values), 4) if values else None, "n": len(values)}

    questions_result = {task: {**accuracy(task), "chance": round(CHANCE[task], 4)} for task in QUESTION_TYPES}
    true_acc, foil_acc = accuracy("verify/true"), accuracy("verify/foil")
    balanced = None
    if true_acc["accuracy"] is not None and foil_acc["accuracy"] is not None:
        balanced = round((true_acc["accuracy"] + foil_acc["accuracy"]) / 2, 4)
    return {
        "model": model.source,
        "image_size": model.image_size,
        "generator_version": GENERATOR_VERSION,
        "split": "heldout",
        "seed": seed,
        "per_type": per_type,
        "questions": questions_result,
        "verification": {"true_captions": true_acc, "foils": foil_acc, "balanced": balanced,
                         "per_foil_kind": {kind: accuracy(f"foil/{kind}") for kind in FOIL_KINDS}},
        "samples": dict(samples),
    }


def format_table(result: dict[str, Any]) -> str:
    """The result as a plain-text table (what the command prints)."""
    lines = [f"held-out generative evaluation of {result['model']} ({result['image_size']} px, corpus generator "
             f"v{result['generator_version']}, seed {result['seed']})", "",
             f"{'question type':<26}{'accuracy':>10}{'chance':>9}{'n':>6}"]
    for task, row in result["questions"].items():
        lines.append(f"{task:<26}{_percent(row['accuracy']):>10}{_percent(row['chance']):>9}{row['n']:>6}")
    verification = result["verification"]
    lines += ["", f"{'verification (Yes/No)':<26}{'accuracy':>10}{'':>9}{'n':>6}"]
    rows = [("true captions", verification["true_captions"]), ("foils (all kinds)", verification["foils"])]
    rows += [(f"  foil: {kind}", row) for kind, row in verification["per_foil_kind"].items()]
    for name, row in rows:
        lines.append(f"{name:<26}{_percent(row['accuracy']):>10}{'':>9}{row['n']:>6}")
    lines.append(f"{'balanced (true + foils)/2':<26}{_percent(verification['balanced']):>10}")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def write_result(result: dict[str, Any], out: str | Path) -> Path:
    from rematch.atomic import write_json_atomically

    path = Path(out) / "generative.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, result)
    return path


def load_generative_model(spec: str, image_size: int | None = None, device: str | None = None) -> GenerativeModel:
    """The backbone ``spec`` names, for generative evaluation.

    ``spec`` is ``tiny-pretrained`` (the shipped backbone), a directory written by
    ``rematch pretrain`` (``<run>/model``: it records its image size), any Qwen-VL backbone
    directory or hub id, or a saved ReMatch model (its backbone, LoRA merged in view).
    ``image_size`` overrides the recorded one (default when nothing is recorded: 112).
    """
    from pathlib import Path

    from rematch.backbones import load_pretrained_backbone
    from rematch.backbones.pretrained_tiny import PRETRAINED_TINY, asset_dir, read_record, verify_checksums
    from rematch.backbones.qwen_vl import QwenVLAdapter
    from rematch.config import ModelConfig
    from rematch.devices import resolve_device
    from rematch.hub import resolve_model_dir

    device = resolve_device(device)
    if spec == PRETRAINED_TINY:
        directory = asset_dir()
        verify_checksums(directory)
    else:
        directory = resolve_model_dir(spec)
    recorded = read_record(directory).get("image_size") if (Path(directory) / "pretraining.json").is_file() else None
    side = int(image_size or recorded or 112)
    if side < 28 or side % 28:
        raise ValueError(f"image size must be a multiple of 28 pixels, got {side}")
    if (Path(directory) / "rematch_config.json").is_file():
        from rematch.model import ReMatchModel

        model = ReMatchModel.from_pretrained(directory, device=device)
        backbone, processor, config = model.backbone, model.adapter.processor, model.config
        config = ModelConfig(**{**config.__dict__, "min_pixels": side * side, "max_pixels": side * side})
    else:
        config = ModelConfig(num_tokens=0, pooling="last", min_pixels=side * side, max_pixels=side * side)
        backbone, processor = load_pretrained_backbone(directory, config)
        backbone = backbone.to(device)
    return GenerativeModel(backbone=backbone.eval(), adapter=QwenVLAdapter(processor, config), image_size=side,
                           source=spec)
