"""Generative pre-training of a tiny Qwen2-VL from random initialisation on the shapes world.

The paper fine-tunes an MLLM that can already answer "Yes"/"No" about an image; our offline
backbone starts random and cannot say anything, so the matching loss had nothing to build
on (issue 12). ``rematch pretrain`` gives it that start in miniature: next-token training
on the answers of :mod:`rematch.world.pretrain_corpus` (captions, short answers, caption
verification against compositional foils), in the backbone adapter's chat format with the
same image processor ReMatch uses later.

It runs in the same training loop as ``rematch train`` (:func:`rematch.training.runner.run_loop`):
config dataclasses + YAML + dotted overrides with the same ``train`` section
(:class:`rematch.config.LoopConfig`), accelerate, the run-directory rules, atomic
checkpoints with exact resume, the JSONL/CSV loss log and its plot, and a stop at the first
non-finite loss. What is here is only its objective (:func:`pretraining_objective`): the
model (a bare backbone, every weight trained), the data stream (example ``i`` of the
corpus, so a resume continues at an index), the loss (answer tokens only; in a
curriculum's ``attributes`` phases the vision tower's attribute loss of
:mod:`rematch.training.tower_warmup`, with the tower frozen in later phases if they say
so), the phases' learning rates, the held-out accuracy during the run, and the saved
backbone. The result is a plain Hugging Face backbone directory plus ``pretraining.json``,
loadable as ``model.backbone`` of any ReMatch recipe.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from rematch.atomic import sha256_of
from rematch.config import ConfigError, LoopConfig, ModelConfig, check_seed
from rematch.training.logs import StepLog
from rematch.training.objective import Objective, RunContext, StepOutput
from rematch.training.runner import run_loop
from rematch.training.curriculum import OBJECTIVES, Curriculum, CurriculumPhase
from rematch.training.answers import AnswerBatch, AnswerCollator, answer_loss
from rematch.training.tower_warmup import AttributeBatch, AttributeCollator, AttributeHeads, attribute_loss
from rematch.training.verification import VerificationBatch, VerificationCollator, verification_aucs, verification_loss
from rematch.world.pretrain_corpus import (
    ATTRIBUTES_TASK,
    GENERATOR_VERSION,
    TASKS,
    CorpusError,
    MATCHING_TASK,
    CorpusSpec,
    make_example,
    scene_example,
    verification_pair,
)

#: What a pre-training run's model directory holds besides the Hugging Face files.
RECORD_FILE = "pretraining.json"
WEIGHTS_FILE = "model.safetensors"
#: Loss-curve rows kept in the record (the reproduction test replays the first of them).
RECORDED_STEPS = 200


@dataclass
class PretrainModelConfig:
    """The backbone to pre-train (built offline, randomly initialised from ``seed``)."""

    tiny_family: str = "qwen2_vl"
    tiny_size: str = "tiny"
    """tiny (~1M parameters), small (~6M) or base (~20M); see rematch.backbones.tiny."""
    seed: int = 0
    image_size: int = 112
    """Side of the rendered scenes in pixels (a multiple of the family's merged patch, 28 or 32): at 56 px a small shape covers
    about 5% of one merged visual token and colour stays at chance (issue 12)."""
    system_prompt: str = ModelConfig.system_prompt
    attn_implementation: str = "sdpa"
    init_from: str | None = None
    """Start from these weights instead of random ones: ``tiny-pretrained`` (the shipped backbone,
    checksums verified) or a pre-training run's ``model`` directory. How a later stage (e.g.
    verification phases) continues a finished recipe without repeating it; the family, size and
    image size must be the ones that backbone was trained with."""


@dataclass
class PretrainDataConfig:
    """The corpus stream (see :mod:`rematch.world.pretrain_corpus`)."""

    seed: int = 0
    task_weights: dict[str, float] = field(default_factory=lambda: {task: 1.0 for task in TASKS})
    object_weights: list[float] = field(default_factory=lambda: [1.0, 2.0, 2.0])
    """Relative frequency of scenes with 1, 2 and 3 objects."""
    phases: list[CurriculumPhase] = field(default_factory=list)
    """The curriculum (:mod:`rematch.training.curriculum`): phases with their own task mix,
    scene difficulty and learning rate, adding up to ``train.steps``. Empty: one phase with
    ``task_weights`` and the train section's scheduler."""
    num_workers: int = 0
    """Threads preparing batches ahead of the step (rendering, tokenisation)."""
    image_position: str = "first"
    """Where each example's image goes: ``first`` (before the prompt, as the embedding formats
    have it), ``last`` (after the question) or ``mixed`` (half and half); see
    :data:`rematch.world.pretrain_corpus.IMAGE_POSITIONS`. Held-out accuracy during the run
    puts it last only for ``last``."""


@dataclass
class PretrainTrainConfig(LoopConfig):
    """How long and how to optimise: the ``train`` section of ``rematch train`` (its fields mean
    the same), with pre-training's defaults and its held-out evaluation during the run."""

    out: str = "runs/pretrain"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_ratio: float = 0.02
    eval_every: int = 0
    """Held-out accuracy (``rematch eval generative`` on ``eval_examples`` per type) every this many
    steps and at the end, into ``heldout.jsonl``: on a plateau the loss is flat while accuracy
    sits at chance, which the loss alone cannot tell from slow learning. 0: off."""
    eval_examples: int = 40

    def validate(self) -> None:
        super().validate()
        if self.eval_every < 0 or self.eval_examples < 1:
            raise ConfigError(f"train.eval_every (0 = off) must be >= 0 and train.eval_examples >= 1, got "
                              f"{self.eval_every} and {self.eval_examples}")


@dataclass
class PretrainConfig:
    """The root of a pre-training run's configuration (``configs/pretrain-tiny.yaml``)."""

    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)

    def validate(self) -> None:
        from rematch.backbones.tiny import FAMILIES, MERGED_PATCH_SIDE, SHAPES

        model, data, train = self.model, self.data, self.train
        if model.tiny_family not in FAMILIES:
            raise ConfigError(f"model.tiny_family must be one of {', '.join(FAMILIES)}, got {model.tiny_family!r}")
        if model.tiny_size not in SHAPES:
            raise ConfigError(f"model.tiny_size must be one of {', '.join(SHAPES)}, got {model.tiny_size!r}")
        side = MERGED_PATCH_SIDE[model.tiny_family]
        if model.image_size < side or model.image_size % side:
            raise ConfigError(f"model.image_size must be a multiple of {side} ({model.tiny_family}'s merged patch), "
                              f"got {model.image_size}")
        check_seed("model.seed", model.seed, 2**63 - 1)
        check_seed("data.seed", data.seed, 2**63 - 1)
        try:
            self.corpus_spec().validate()
        except CorpusError as error:
            raise ConfigError(f"data: {error}") from None
        if data.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {data.num_workers}")
        train.validate()
        if data.phases and train.scheduler != "constant":
            raise ConfigError(f"with data.phases each phase sets its learning rate (lr, lr_end); set "
                              f"train.scheduler: constant (got {train.scheduler!r}) so no second schedule is "
                              "applied on top")
        self.curriculum()

    def corpus_spec(self) -> CorpusSpec:
        return CorpusSpec(split="pretrain", seed=self.data.seed, task_weights=dict(self.data.task_weights),
                          object_weights=tuple(self.data.object_weights), image_position=self.data.image_position)

    def curriculum(self) -> Curriculum:
        return Curriculum.from_config(self.corpus_spec(), self.data.phases, self.train.steps, self.train.lr,
                                      self.train.warmup_ratio)

    def model_config(self) -> ModelConfig:
        """The adapter settings: images enter at exactly ``image_size`` pixels a side."""
        pixels = self.model.image_size ** 2
        return ModelConfig(backbone="tiny", tiny_family=self.model.tiny_family, tiny_size=self.model.tiny_size,
                           seed=self.model.seed, num_tokens=0, pooling="last", min_pixels=pixels,
                           max_pixels=pixels, system_prompt=self.model.system_prompt,
                           attn_implementation=self.model.attn_implementation)


def load_pretrain_config(path: str | Path | None, overrides=()) -> PretrainConfig:
    from rematch.config import load_config

    return load_config(path, overrides, cls=PretrainConfig)


# ---------------------------------------------------------------------- data: corpus index stream


class CorpusStream:
    """Corpus examples in index order, forever; the position is the next index.

    Example ``i`` is a pure function of the curriculum and ``i`` (its phase is the phase
    of step ``i // global_batch``), so resuming needs only the index: nothing is replayed
    or skipped.
    """

    def __init__(self, curriculum: Curriculum, global_batch: int):
        self.curriculum = curriculum
        self.global_batch = global_batch
        self.next_index = 0

    def __iter__(self) -> Iterator:
        while True:
            index = self.next_index
            self.next_index += 1
            phase = self.curriculum.phase_at(index // self.global_batch)
            scenes = {"large_only": phase.large_only, "single_object": phase.single_object,
                      "object_scale": phase.object_scale}
            if phase.objective == "matching" and is_verification_pair(phase.matching_share, phase.spec, index):
                yield verification_pair(phase.spec, index, foil_kinds=phase.foil_kinds, **scenes)
            else:
                yield (scene_example if phase.objective == "attributes" else make_example)(phase.spec, index, **scenes)

    def state_dict(self) -> dict[str, Any]:
        return {"next_index": self.next_index, "generator_version": GENERATOR_VERSION}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("generator_version") != GENERATOR_VERSION:
            raise ConfigError(f"the checkpoint was written with corpus generator version "
                              f"{state.get('generator_version')}, this is version {GENERATOR_VERSION}: its data "
                              "stream cannot be continued; start a new run")
        self.next_index = int(state["next_index"])


# ---------------------------------------------------------------------- model


class PretrainObjective(nn.Module):
    """The backbone with its pre-training loss as the forward (what DDP wraps: the loss must
    run inside ``forward`` for gradients to be synchronised): the answer-only loss for answer
    batches, the tower's attribute loss for attribute batches (``heads`` exist only when the
    curriculum has an ``attributes`` phase)."""

    def __init__(self, backbone: nn.Module, adapter, heads: AttributeHeads | None = None):
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.heads = heads

    def forward(self, batch: AnswerBatch | AttributeBatch | VerificationBatch | MixedBatch) -> dict[str, torch.Tensor]:
        batch = batch.to(self.backbone.device)
        if isinstance(batch, MixedBatch):  # the sum of both means, each averaged over every process's own count
            matching = verification_loss(self.backbone, self.adapter, batch.matching)
            answers = answer_loss(self.backbone, self.adapter, batch.answers)
            loss = (self.global_mean(matching["loss"], matching["count"])
                    + self.global_mean(answers["loss"], answers["count"]))
            return {"loss": loss, "matching_loss": matching["loss"].detach(), "answers_loss": answers["loss"].detach(),
                    "matching_accuracy": matching["matching_accuracy"]}
        if isinstance(batch, VerificationBatch):
            terms = verification_loss(self.backbone, self.adapter, batch)
        elif isinstance(batch, AttributeBatch):
            if self.heads is None:
                raise ValueError("an attribute batch needs the attribute heads of an attributes phase")
            terms = attribute_loss(self.backbone, self.adapter, self.heads, batch)
        else:
            terms = answer_loss(self.backbone, self.adapter, batch)
        return {**terms, "loss": self.global_mean(terms["loss"], terms["count"])}

    @staticmethod
    def global_mean(local_mean: torch.Tensor, local_count: torch.Tensor) -> torch.Tensor:
        """Rescale this process's mean so that DDP's gradient average is the mean over every
        process's tokens (objects): ranks hold different numbers of answer tokens, and an average
        of per-rank means would weigh a short answer on a small rank more than one process would."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return local_mean
        world = torch.distributed.get_world_size()
        total = local_count.detach().clone()
        torch.distributed.all_reduce(total)
        return local_mean * (world * local_count / total)


@dataclass
class MixedBatch:
    """A matching phase's step that also asks questions: its verification pairs and its answers."""

    matching: VerificationBatch
    answers: AnswerBatch

    def to(self, device) -> "MixedBatch":
        return MixedBatch(self.matching.to(device), self.answers.to(device))


def is_verification_pair(share: float, spec: CorpusSpec, index: int) -> bool:
    """Whether example ``index`` of a matching phase is a verification pair (else a question):
    an RNG of its own, so the pairs and questions themselves do not depend on the share."""
    return share >= 1 or random.Random(f"rematch/pretrain/matching-share/{spec.split}/{spec.seed}/{index}"
                                       ).random() < share


class PhaseCollator:
    """Each step's examples into the batch its phase trains on: all examples of a step share a phase."""

    def __init__(self, adapter, image_size: int, system_prompt: str, matching_instruction: str):
        self.answers = AnswerCollator(adapter, image_size)
        self.attributes = AttributeCollator(adapter, image_size)
        self.matching = VerificationCollator(adapter, image_size, system_prompt, matching_instruction)

    def __call__(self, examples) -> AnswerBatch | AttributeBatch | VerificationBatch:
        tasks = {example.task for example in examples}
        if tasks == {ATTRIBUTES_TASK}:
            return self.attributes(examples)
        if tasks == {MATCHING_TASK}:
            return self.matching(examples)
        if MATCHING_TASK in tasks and ATTRIBUTES_TASK not in tasks:  # a matching phase with questions mixed in
            return MixedBatch(self.matching([e for e in examples if e.task == MATCHING_TASK]),
                              self.answers([e for e in examples if e.task != MATCHING_TASK]))
        if not tasks <= set(TASKS):
            raise ValueError(f"a batch mixes {sorted(tasks)}: one step belongs to one phase")
        return self.answers(examples)


def optimiser_groups(module: PretrainObjective, train: "PretrainTrainConfig") -> list[dict[str, Any]]:
    """Two parameter groups, the vision tower (with its merger) first and everything else, so a
    phase can freeze the tower by giving its group a learning rate of 0 (DDP-safe, unlike
    switching ``requires_grad`` mid-run)."""
    tower = {id(p) for p in module.adapter.core(module.backbone).visual.parameters()}
    trainable = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if id(p) in tower], "lr": train.lr, "weight_decay": train.weight_decay},
            {"params": [p for p in trainable if id(p) not in tower], "lr": train.lr,
             "weight_decay": train.weight_decay}]


def build_backbone(config: PretrainConfig):
    """The backbone and its adapter, exactly as ``config.model`` says: randomly initialised, or
    the weights ``model.init_from`` names."""
    from rematch.backbones import adapter_for, build_tiny_backbone, load_pretrained_backbone
    from rematch.backbones.pretrained_tiny import PRETRAINED_TINY, asset_dir, read_record, verify_checksums

    model_config = config.model_config()
    if config.model.init_from is not None:
        source = Path(config.model.init_from)
        if config.model.init_from == PRETRAINED_TINY:
            source = asset_dir()
            verify_checksums(source)
        if not (source / RECORD_FILE).is_file():
            raise ConfigError(f"model.init_from: {source} is not a pre-trained backbone ({RECORD_FILE} is missing); "
                              f"give {PRETRAINED_TINY} or a pre-training run's model directory")
        recorded = read_record(source)
        trained = recorded.get("recipe", {}).get("model", {})
        for key in ("tiny_family", "tiny_size", "image_size"):
            if key in trained and trained[key] != getattr(config.model, key):
                raise ConfigError(f"model.init_from: {source} was trained with model.{key} = {trained[key]!r}, "
                                  f"this recipe says {getattr(config.model, key)!r}")
        backbone, processor = load_pretrained_backbone(source, model_config)
    else:
        backbone, processor = build_tiny_backbone(config.model.tiny_family, config.model.tiny_size,
                                                  config.model.seed)
    backbone.set_attn_implementation(config.model.attn_implementation)
    return backbone, adapter_for(backbone.config.model_type)(processor, model_config)


# ---------------------------------------------------------------------- the run


@dataclass
class PretrainResult:
    model_dir: Path
    steps: int
    seconds: float
    final_loss: float | None
    loss_plot: Path | None


def pretrain(config: PretrainConfig, show_progress: bool = True, log: Callable[[str], None] = print,
             stop_after: int | None = None) -> PretrainResult:
    """Pre-train as ``config`` says; the backbone directory is ``<train.out>/model``.

    ``stop_after`` runs only the first steps of the recipe (same schedule, data and seeds)
    and writes their log and a checkpoint, no model: how a test checks that a recipe still
    reproduces its recorded loss curve without paying for the whole run.
    """
    config.validate()
    # an attributes phase leaves the language model without gradients, an answers phase the heads
    result = run_loop(config, lambda context: pretraining_objective(config, context), name="pretrain",
                      show_progress=show_progress, log=log, stop_after=stop_after,
                      find_unused_parameters=config.curriculum().uses_attributes)
    return PretrainResult(model_dir=result.model_dir, steps=result.steps, seconds=result.seconds,
                          final_loss=result.final_losses.get("loss"), loss_plot=result.loss_plot)


def pretraining_objective(config: PretrainConfig, context: RunContext) -> Objective:
    """What ``rematch pretrain`` trains: built after seeding, in this order (backbone, heads),
    so a seed gives the same initial weights as always."""
    train, curriculum = config.train, config.curriculum()
    backbone, adapter = build_backbone(config)
    heads = AttributeHeads(adapter.causal_lm(backbone).config.get_text_config().hidden_size) \
        if curriculum.uses_attributes else None
    module = PretrainObjective(backbone, adapter, heads)

    def step(wrapped: nn.Module, batch: AnswerBatch | AttributeBatch, index: int) -> StepOutput:
        terms = wrapped(batch)
        kind = ("attributes" if isinstance(batch, AttributeBatch) else
                "matching" if isinstance(batch, (VerificationBatch, MixedBatch)) else "answers")
        # the mean over all processes (DDP's gradient is its gradient): every rank logs and
        # checks the same number, so all of them stop together on a non-finite loss
        value = context.mean_over_processes(terms["loss"])
        accuracies = {name: round(context.mean_over_processes(term), 4) for name, term in terms.items()
                      if name.endswith("_accuracy")}  # collectives too: every rank, every step
        # the objectives' losses are different quantities (three cross-entropies summed per object
        # vs one per answer token vs one per Yes/No answer): each gets its own column and plot panel;
        # a matching step that also asks questions logs both parts
        parts = ({"matching_loss": context.mean_over_processes(terms["matching_loss"]),
                  "answers_loss": context.mean_over_processes(terms["answers_loss"])}
                 if isinstance(batch, MixedBatch) else {f"{kind}_loss": value})
        return StepOutput({"loss": value, **parts}, backward=terms["loss"], metrics={"objective": kind, **accuracies})

    def save_model(directory: Path, rows: list[dict[str, Any]], seconds: float) -> None:
        save_pretrained_backbone(backbone, adapter.processor, directory, config, rows, seconds)

    return Objective(
        module=module, parameter_groups=optimiser_groups(module, train),
        source=CorpusStream(curriculum, train.batch_size * context.processes),
        collate=PhaseCollator(adapter, config.model.image_size, config.model.system_prompt,
                              ModelConfig.matching_instruction),
        step=step, save_model=save_model,
        workers=config.data.num_workers,
        lr_lambdas=[curriculum.tower_lr_scale(train.lr), curriculum.lr_scale(train.lr)]
        if curriculum.schedules_lr else None,
        summary=lambda: {"generator_version": GENERATOR_VERSION},
        open_evaluation=(lambda start: HeldoutLog(context.out, start, backbone, adapter, config))
        if train.eval_every else None,
        plot_title="pre-training losses", plot_terms=[f"{objective}_loss" for objective in OBJECTIVES])


class HeldoutLog:
    """Held-out accuracy during a run (``train.eval_every``), one row per measurement in
    ``heldout.jsonl`` / ``heldout.csv``: the accuracy of each question type and of
    verification on true captions and on foils and how well p("Yes") separates them
    (``verification_auc``), as ``rematch eval generative`` computes them.

    The examples are the ``heldout`` split's first ``train.eval_examples`` per type, the same
    at every measurement, so the rows are comparable along the run.
    """

    def __init__(self, out: Path, resume_step: int, backbone: nn.Module, adapter, config: PretrainConfig):
        from rematch.world.pretrain_corpus import asked_position, heldout_examples, heldout_verification_pairs

        self.backbone, self.adapter, self.image_size = backbone, adapter, config.model.image_size
        self.every = config.train.eval_every
        self.examples = heldout_examples(config.train.eval_examples, image_position=asked_position(
            config.data.image_position))
        self.pairs = heldout_verification_pairs(2 * config.train.eval_examples)  # both orientations
        self.system_prompt = config.model.system_prompt
        self.log = StepLog(out, resume_step=resume_step, tensorboard=False, name="heldout")

    def measure(self, step: int) -> str:
        from rematch.training.answers import score_examples
        from rematch.world.pretrain_corpus import QUESTION_TYPES

        scores = score_examples(self.backbone, self.adapter, self.examples, self.image_size)
        row = {"step": step, **{task: scores.accuracy(task) for task in QUESTION_TYPES},
               "true_captions": scores.accuracy("verify/true"), "foils": scores.accuracy("verify/foil"),
               "verification_auc": scores.verification_auc(),
               **{f"matching_auc/{kind}": auc for kind, auc in verification_aucs(
                   self.backbone, self.adapter, self.pairs, self.image_size, self.system_prompt,
                   ModelConfig.matching_instruction).items()}}
        self.log.append(row)
        accuracies = ", ".join(f"{key} {100 * value:.0f}%" for key, value in row.items()
                               if key != "step" and "auc" not in key and value is not None)
        auc = row["verification_auc"]
        matching = ", ".join(f"{key.split('/')[1]} {value:.2f}" for key, value in row.items()
                             if key.startswith("matching_auc/"))
        return (f"step {step} held-out accuracy: {accuracies}" + ("" if auc is None else f"; verification AUC {auc:.2f}")
                + f"; matching-layout AUC {matching}")

    def close(self) -> None:
        self.log.close()


def init_checksum(init_from: str) -> str:
    """The sha256 of the weights a run started from (``model.init_from``), so the record names
    them exactly even after ``tiny-pretrained`` itself is rebuilt."""
    from rematch.backbones.pretrained_tiny import PRETRAINED_TINY, asset_dir

    return sha256_of((asset_dir() if init_from == PRETRAINED_TINY else Path(init_from)) / WEIGHTS_FILE)


def save_pretrained_backbone(backbone: nn.Module, processor, model_dir: Path, config: PretrainConfig,
                             loss_rows: list[dict[str, Any]], seconds: float) -> None:
    """Write the backbone (Hugging Face layout, safetensors) and ``pretraining.json``: the
    recipe, seeds, corpus generator version, the weights' sha256 and the first loss rows."""
    from rematch.atomic import write_directory_atomically

    def write(directory: Path) -> None:
        backbone.save_pretrained(directory, safe_serialization=True)
        processor.save_pretrained(directory)
        weights = directory / WEIGHTS_FILE
        record = {
            "format": "rematch-pretrained-backbone/1",
            "generator_version": GENERATOR_VERSION,
            "image_size": config.model.image_size,
            "seeds": {"model": config.model.seed, "data": config.data.seed, "train": config.train.seed},
            "steps": config.train.steps,
            "train_seconds": round(seconds, 1),
            "sha256": {WEIGHTS_FILE: sha256_of(weights)},
            **({"init_from": config.model.init_from, "init_sha256": init_checksum(config.model.init_from)}
               if config.model.init_from is not None else {}),
            "recipe": dataclasses.asdict(config),
            "loss_curve": loss_rows[:RECORDED_STEPS],
        }
        (directory / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    write_directory_atomically(model_dir, write, what="a pre-trained backbone",
                               is_ours=lambda path: (path / RECORD_FILE).is_file())

