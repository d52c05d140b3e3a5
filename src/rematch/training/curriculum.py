"""The pre-training curriculum: phases with their own task mix, scene difficulty and learning rate.

Why phases (issue 12, measured in ``docs/pretraining.md``): a randomly initialised tiny
Qwen2-VL first learns to answer from the text alone and then sits on that plateau. Colour
questions about single objects at lr 2e-3 are what leaves it (about 600 steps), a lower lr
or a mix with other questions stays on it for the whole budget, and once the model looks at
the image the other questions can be added at a gentler lr. One task mix and one schedule
for the whole run cannot say that; a list of phases can.

Each phase is a pure function of the step, so example ``i`` of the stream is still a pure
function of ``(spec, i)`` and a resumed run needs nothing but its index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from rematch.config import ConfigError
from rematch.world.pretrain_corpus import FOIL_KINDS, CorpusError, CorpusSpec


@dataclass
class CurriculumPhase:
    """One stretch of pre-training (a list of these is ``data.phases`` in a pretrain config)."""

    steps: int = 0
    task_weights: dict[str, float] = field(default_factory=dict)
    """Relative frequency of each corpus task in this phase (tasks left out are not drawn)."""
    object_weights: list[float] | None = None
    """Scenes with 1, 2, 3 objects; None: ``data.object_weights``."""
    single_object: bool = False
    """One object per scene (two for relation questions): the whole image answers the question."""
    large_only: bool = False
    """Every object large."""
    object_scale: float = 1.0
    """Draw objects this many times their size: > 1 makes the image's colour visible in most
    visual tokens (how a random backbone first learns to look at the image); 1 is the world."""
    lr: float | None = None
    """The learning rate at the phase's start; None: ``train.lr``."""
    lr_end: float | None = None
    """Cosine decay within the phase down to this value; None: constant at ``lr``."""
    objective: str = "answers"
    """``answers``: next-token answers to the phase's tasks. ``attributes``: the vision tower
    alone learns every object's colour, shape and size from its merged tokens
    (:mod:`rematch.training.tower_warmup`); its scenes follow the phase's scene settings and
    it takes no ``task_weights``. ``matching``: a true caption against a foil of it, asked in the
    matching branch's packed layout (:mod:`rematch.training.verification`); no ``task_weights``,
    its foils are ``foil_kinds``."""
    foil_kinds: list[str] | None = None
    """The foils of a ``matching`` phase (None: every kind the scenes allow; single objects
    allow only colour, shape and size replacements)."""
    matching_share: float = 1.0
    """The fraction of a ``matching`` phase's examples that are verification pairs; the rest are
    questions of its ``task_weights``, trained in the same steps (the loss is the sum of both
    means). Measured: 250 steps of pairs alone took every held-out question type to 0%."""
    freeze_tower: bool = False
    """Keep the vision tower (with its merger) as it is during this phase (its learning rate is 0):
    after an ``attributes`` phase, so answer training uses the tower's features without
    unlearning them (measured: unfreezing at lr 1e-3 lost half the held-out colour and shape
    accuracy within 500 steps)."""


OBJECTIVES = ("answers", "attributes", "matching")


@dataclass(frozen=True)
class ResolvedPhase:
    """A phase with its defaults filled in and its place in the run."""

    start: int
    stop: int
    spec: CorpusSpec
    single_object: bool
    large_only: bool
    object_scale: float
    lr: float
    lr_end: float | None
    objective: str = "answers"
    freeze_tower: bool = False
    foil_kinds: tuple[str, ...] | None = None
    matching_share: float = 1.0


class Curriculum:
    """The phases of a run, looked up by step.

    Without phases the whole run is one phase with ``data.task_weights`` and the train
    section's own scheduler (``schedules_lr`` is False); with phases the learning rate
    comes from them and ``train.warmup_ratio`` warms up the first steps.
    """

    def __init__(self, phases: Sequence[ResolvedPhase], schedules_lr: bool, warmup_steps: int = 0):
        self.phases = list(phases)
        self.schedules_lr = schedules_lr
        self.warmup_steps = warmup_steps

    @classmethod
    def from_config(cls, base: CorpusSpec, phases: Sequence[CurriculumPhase], total_steps: int, lr: float,
                    warmup_ratio: float = 0.0) -> "Curriculum":
        """Resolve ``phases`` (a config's ``data.phases``) against the run's defaults, checking each.

        Errors name the phase (``data.phases[2].task_weights``) and what is wrong.
        """
        if not phases:
            return cls([ResolvedPhase(0, total_steps, base, False, False, 1.0, lr, None)], schedules_lr=False)
        resolved, start = [], 0
        for number, phase in enumerate(phases):
            where = f"data.phases[{number}]"
            if not isinstance(phase, CurriculumPhase):
                raise ConfigError(f"{where} must be a mapping of phase settings, got {phase!r}")
            if phase.steps < 1:
                raise ConfigError(f"{where}.steps must be >= 1, got {phase.steps}")
            if phase.objective not in OBJECTIVES:
                raise ConfigError(f"{where}.objective must be one of {', '.join(OBJECTIVES)}, got {phase.objective!r}")
            if phase.objective == "matching":
                if not 0 < phase.matching_share <= 1:
                    raise ConfigError(f"{where}.matching_share must be within (0, 1], got {phase.matching_share}")
                if (phase.matching_share < 1) != bool(phase.task_weights):
                    raise ConfigError(f"{where}: a matching phase asks questions exactly when matching_share < 1; "
                                      f"give both task_weights and matching_share < 1, or neither (got task_weights "
                                      f"{dict(phase.task_weights)}, matching_share {phase.matching_share})")
            elif phase.matching_share != 1.0:
                raise ConfigError(f"{where}.matching_share: only a matching phase mixes in verification pairs")
            if phase.foil_kinds is not None:
                unknown = sorted(set(phase.foil_kinds) - set(FOIL_KINDS))
                if phase.objective != "matching" or unknown or not phase.foil_kinds:
                    raise ConfigError(f"{where}.foil_kinds: only a matching phase takes foil kinds, a non-empty list "
                                      f"of {', '.join(FOIL_KINDS)} (got {list(phase.foil_kinds)})")
            if phase.objective == "attributes":
                if phase.task_weights:
                    raise ConfigError(f"{where}: an attributes phase reads objects off the scene and asks no "
                                      f"questions; remove its task_weights ({dict(phase.task_weights)})")
                if phase.freeze_tower:
                    raise ConfigError(f"{where}: an attributes phase trains only the vision tower, so "
                                      "freeze_tower would leave it nothing to train")
            task_weights = (dict(phase.task_weights) if phase.objective == "answers" or phase.task_weights
                            else dict(base.task_weights))
            spec = replace(base, task_weights=task_weights,
                           object_weights=tuple(phase.object_weights if phase.object_weights is not None
                                                else base.object_weights))
            try:
                spec.validate()
            except CorpusError as error:
                raise ConfigError(f"{where}: {error}") from None
            if not (math.isfinite(phase.object_scale) and 0 < phase.object_scale <= 8):
                raise ConfigError(f"{where}.object_scale must be within (0, 8], got {phase.object_scale}")
            phase_lr = lr if phase.lr is None else phase.lr
            for name, value in (("lr", phase_lr), ("lr_end", phase.lr_end)):
                if value is not None and not (math.isfinite(value) and value >= 0):
                    raise ConfigError(f"{where}.{name} must be a finite number >= 0, got {value}")
            resolved.append(ResolvedPhase(start, start + phase.steps, spec, phase.single_object, phase.large_only,
                                          phase.object_scale, phase_lr, phase.lr_end, phase.objective,
                                          phase.freeze_tower,
                                          tuple(phase.foil_kinds) if phase.foil_kinds is not None else None,
                                          phase.matching_share))
            start += phase.steps
        if start != total_steps:
            raise ConfigError(f"data.phases add up to {start} steps but train.steps is {total_steps}: make them "
                              "equal, so the run's length is said once")
        return cls(resolved, schedules_lr=True, warmup_steps=int(warmup_ratio * total_steps))

    def phase_at(self, step: int) -> ResolvedPhase:
        """The phase that step ``step`` (0-based) belongs to; steps past the end stay in the last one."""
        for phase in self.phases:
            if step < phase.stop:
                return phase
        return self.phases[-1]

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (only meaningful when ``schedules_lr``)."""
        phase = self.phase_at(step)
        lr = phase.lr
        if phase.lr_end is not None:
            progress = (step - phase.start) / max(1, phase.stop - phase.start)
            lr = phase.lr_end + 0.5 * (phase.lr - phase.lr_end) * (1 + math.cos(math.pi * progress))
        if step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr

    def lr_scale(self, base_lr: float):
        """``step -> lr_at(step) / base_lr``: the factor a ``LambdaLR`` over an optimiser at ``base_lr`` needs."""
        return lambda step: self.lr_at(step) / base_lr

    def tower_lr_scale(self, base_lr: float):
        """The same for the vision tower's parameter group: 0 in the phases that freeze it."""
        return lambda step: 0.0 if self.phase_at(step).freeze_tower else self.lr_at(step) / base_lr

    @property
    def uses_attributes(self) -> bool:
        """Whether some phase trains the tower's attribute heads (they then exist in the run)."""
        return any(phase.objective == "attributes" for phase in self.phases)
