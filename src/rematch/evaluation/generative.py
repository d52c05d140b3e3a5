"""The backbone as an MLLM: does it answer questions about held-out scenes, and can it tell a
true caption from a compositional foil?

Examples come from the corpus's ``heldout`` split (:mod:`rematch.world.pretrain_corpus`),
whose scenes lie in the other half of all layouts than pre-training's, so none was seen in
training. Short answers are decoded greedily and compared after normalisation (exact
match); verification reads the two LM-head rows of "Yes" and "No" at the first answer
position, the score ReMatch's matching head uses, and is reported on true captions and on
foils separately (and per foil kind), since a model that always says "Yes" gets 50% on a
balanced mix and 0% on foils. Accuracies threshold p("Yes") at 0.5, so the report adds the
separation of true captions from foils (ROC AUC, 0.5 = none) and the mean p("Yes") of each:
a model whose p("Yes") is 0.505 for every caption has not learned to verify, whatever
side of 0.5 its accuracies fall on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rematch.config import ModelConfig
from rematch.training.answers import score_examples
from rematch.training.verification import verification_aucs
from rematch.world.pretrain_corpus import (
    ANSWERS,
    FOIL_KINDS,
    GENERATOR_VERSION,
    QUESTION_TYPES,
    asked_position,
    heldout_examples,
    heldout_verification_pairs,
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
    image_position: str = "first"
    """Where its pre-training put the image (``data.image_position``; ``first`` for ``mixed``
    and for any other backbone): what :func:`evaluate_generative` uses unless told otherwise."""


def evaluate_generative(model: GenerativeModel, per_type: int = 200, seed: int = 0,
                        batch_size: int = 64, image_position: str | None = None) -> dict[str, Any]:
    """Accuracy per question type and verification accuracy (true captions, foils, per foil kind).
    ``image_position`` puts each image before (``first``) or after (``last``) its question;
    None: as the model was pre-trained (:attr:`GenerativeModel.image_position`). The examples
    are otherwise the same."""
    image_position = image_position or model.image_position
    examples = heldout_examples(per_type, seed, image_position)
    scores = score_examples(model.backbone, model.adapter, examples, model.image_size, batch_size,
                            samples_per_task=3)

    def accuracy(key: str) -> dict[str, float | int]:
        return {"accuracy": scores.accuracy(key), "n": len(scores.correct.get(key, []))}

    questions_result = {task: {**accuracy(task), "chance": round(CHANCE[task], 4)} for task in QUESTION_TYPES}
    # the same question asked the way the matching head asks it (rematch.training.verification):
    # per_type pairs, a true caption (or scene) against its foil, half image -> text, half text -> image
    matching_aucs = verification_aucs(model.backbone, model.adapter, heldout_verification_pairs(per_type, seed),
                                      model.image_size, ModelConfig.system_prompt, ModelConfig.matching_instruction,
                                      batch_size=max(1, batch_size // 4))
    true_acc, foil_acc = accuracy("verify/true"), accuracy("verify/foil")
    return {
        "model": model.source,
        "image_size": model.image_size,
        "generator_version": GENERATOR_VERSION,
        "split": "heldout",
        "seed": seed,
        "per_type": per_type,
        "image_position": image_position,
        "questions": questions_result,
        "verification": {"true_captions": true_acc, "foils": foil_acc, "balanced": scores.balanced_verification(),
                         "per_foil_kind": {kind: accuracy(f"foil/{kind}") for kind in FOIL_KINDS},
                         "auc": scores.verification_auc(),
                         "mean_yes_probability": {"true_captions": scores.mean_yes_probability("verify/true"),
                                                  "foils": scores.mean_yes_probability("verify/foil")}},
        "matching_layout": {"auc": matching_aucs, "pairs": per_type},
        "samples": dict(scores.samples),
    }


def format_table(result: dict[str, Any]) -> str:
    """The result as a plain-text table (what the command prints)."""
    lines = [f"held-out generative evaluation of {result['model']} ({result['image_size']} px, corpus generator "
             f"v{result['generator_version']}, seed {result['seed']}, image "
             f"{'after' if result.get('image_position') == 'last' else 'before'} the question)", "",
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
    if verification.get("auc") is not None:  # results written before it was measured lack it
        mean_yes = verification["mean_yes_probability"]
        lines.append(f"{'separation (AUC)':<26}{verification['auc']:>10.3f}{'0.500':>9}"
                     f"   mean p(Yes): true {mean_yes['true_captions']:.3f}, foils {mean_yes['foils']:.3f}")
    matching = result.get("matching_layout")
    if matching:  # results written before it was measured lack it
        lines += ["", f"{'matching layout (AUC)':<26}{'true vs foil':>14}{'chance':>9}   {matching['pairs']} pairs"]
        lines += [f"{'  ' + kind:<26}{auc:>14.3f}{'0.500':>9}" for kind, auc in matching["auc"].items()]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


RESULT_FILE = "generative.json"


def check_result_directory(out: str | Path) -> None:
    """Refuse an ``--out`` that is not new, empty or an earlier ``eval generative`` output, or
    that holds a ``generative.json`` of the user's, before the evaluation runs."""
    from rematch.outputs import OutputDirectory

    OutputDirectory.inspect(out, "eval generative", adopt=_earlier_results).check(RESULT_FILE)


def write_result(result: dict[str, Any], out: str | Path) -> Path:
    from rematch.atomic import write_json_atomically
    from rematch.outputs import claim_outputs

    outputs = claim_outputs(out, "eval generative", [RESULT_FILE], adopt=_earlier_results)
    path = Path(out) / RESULT_FILE
    write_json_atomically(path, result)
    outputs.seal()
    return path


def _earlier_results(directory: Path) -> set[str]:
    """A ``generative.json`` written before output markers: a JSON object with rematch's result keys."""
    import json

    try:
        record = json.loads((directory / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    ours = isinstance(record, dict) and {"questions", "verification", "generator_version"} <= set(record)
    return {RESULT_FILE} if ours else set()


def load_generative_model(spec: str, image_size: int | None = None, device: str | None = None) -> GenerativeModel:
    """The backbone ``spec`` names, for generative evaluation.

    ``spec`` is ``tiny-pretrained`` (the shipped backbone), a directory written by
    ``rematch pretrain`` (``<run>/model``: it records its image size), any Qwen-VL backbone
    directory or hub id, or a saved ReMatch model (its backbone, LoRA merged in view).
    ``image_size`` overrides the recorded one (default when nothing is recorded: 112).
    """
    from pathlib import Path

    from rematch.backbones import adapter_for, load_pretrained_backbone
    from rematch.backbones.pretrained_tiny import PRETRAINED_TINY, asset_dir, read_record, verify_checksums
    from rematch.config import ModelConfig
    from rematch.devices import resolve_device
    from rematch.hub.resolve import resolve_model_dir

    device = resolve_device(device)
    if spec == PRETRAINED_TINY:
        directory = asset_dir()
        verify_checksums(directory)
    else:
        directory = resolve_model_dir(spec)
    record = read_record(directory) if (Path(directory) / "pretraining.json").is_file() else {}
    side = int(image_size or record.get("image_size") or 112)
    # a model pre-trained with its images after the questions is asked the same way
    position = asked_position(record.get("recipe", {}).get("data", {}).get("image_position", "first"))
    if (Path(directory) / "rematch_config.json").is_file():
        from rematch.model import ReMatchModel

        model = ReMatchModel.from_pretrained(directory, device=device)
        backbone, processor, config = model.backbone, model.adapter.processor, model.config
        config = ModelConfig(**{**config.__dict__, "min_pixels": side * side, "max_pixels": side * side})
    else:
        config = ModelConfig(num_tokens=0, pooling="last", min_pixels=side * side, max_pixels=side * side)
        backbone, processor = load_pretrained_backbone(directory, config)
        backbone = backbone.to(device)
    adapter = adapter_for(backbone.config.model_type)(processor, config)
    if side < adapter.image_factor or side % adapter.image_factor:
        raise ValueError(f"image size must be a multiple of {adapter.image_factor} pixels (the backbone's merged "
                         f"patch), got {side}")
    return GenerativeModel(backbone=backbone.eval(), adapter=adapter, image_size=side, source=spec,
                           image_position=position)
