"""The pre-training curriculum: phases resolve, select their examples and set the learning rate."""

from __future__ import annotations

import math

import pytest
import torch

from rematch.config import ConfigError
from rematch.training.curriculum import Curriculum, CurriculumPhase
from rematch.training.pretrain import CorpusStream, load_pretrain_config
from rematch.world.pretrain_corpus import CorpusSpec

BASE = CorpusSpec(split="pretrain", seed=3)
PHASES = [CurriculumPhase(steps=4, task_weights={"colour": 1.0}, single_object=True, lr=2e-3),
          CurriculumPhase(steps=6, task_weights={"shape": 1.0, "verify": 1.0}, lr=1e-3, lr_end=1e-4)]


def test_each_step_draws_from_its_phase_and_resumes_by_index():
    curriculum = Curriculum.from_config(BASE, PHASES, total_steps=10, lr=5e-4)
    stream = CorpusStream(curriculum, global_batch=3)
    examples = [next(iter_) for iter_ in [iter(stream)] for _ in range(30)]
    assert {e.task for e in examples[:12]} == {"colour"}  # steps 0-3
    assert all(len(e.scene.objects) == 1 for e in examples[:12])
    assert {e.task for e in examples[12:]} == {"shape", "verify"}
    resumed = CorpusStream(curriculum, global_batch=3)
    resumed.load_state_dict({"next_index": 14, "generator_version": stream.state_dict()["generator_version"]})
    again = next(iter(resumed))
    assert (again.prompt, again.answer, again.scene) == (examples[14].prompt, examples[14].answer,
                                                        examples[14].scene)


def test_phase_learning_rates_with_warmup_and_cosine_decay():
    curriculum = Curriculum.from_config(BASE, PHASES, total_steps=10, lr=5e-4, warmup_ratio=0.2)
    assert curriculum.schedules_lr and curriculum.warmup_steps == 2
    assert curriculum.lr_at(0) == pytest.approx(1e-3) and curriculum.lr_at(1) == pytest.approx(2e-3)
    assert curriculum.lr_at(3) == pytest.approx(2e-3)
    assert curriculum.lr_at(4) == pytest.approx(1e-3)  # the decay starts at the phase's lr ...
    middle = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 3 / 6))
    assert curriculum.lr_at(7) == pytest.approx(middle)
    assert curriculum.lr_at(9) < curriculum.lr_at(8) < middle  # ... and falls towards lr_end

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, curriculum.lr_scale(5e-4))
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([curriculum.lr_at(step) for step in range(10)])


def test_no_phases_is_one_phase_with_the_sections_own_schedule():
    curriculum = Curriculum.from_config(BASE, [], total_steps=7, lr=5e-4)
    assert not curriculum.schedules_lr
    assert curriculum.phase_at(0).spec == BASE and curriculum.phase_at(6).spec == BASE


@pytest.mark.parametrize("phases, message", [
    ([CurriculumPhase(steps=4, task_weights={"colour": 1.0})], r"add up to 4 steps but train.steps is 10"),
    ([CurriculumPhase(steps=10, task_weights={"colours": 1.0})], r"data.phases\[0\]: unknown corpus tasks"),
    ([CurriculumPhase(steps=10, task_weights={})], r"data.phases\[0\]: task weights must be"),
    ([CurriculumPhase(steps=0, task_weights={"colour": 1.0})], r"data.phases\[0\].steps must be >= 1"),
    ([CurriculumPhase(steps=10, task_weights={"colour": 1.0}, lr_end=float("nan"))],
     r"data.phases\[0\].lr_end must be a finite number"),
    ([CurriculumPhase(steps=10, task_weights={"colour": 1.0}, objective="captions")],
     r"data.phases\[0\].objective must be one of answers, attributes"),
    ([CurriculumPhase(steps=10, task_weights={"colour": 1.0}, objective="attributes")],
     r"data.phases\[0\]: an attributes phase .* remove its task_weights"),
    ([CurriculumPhase(steps=10, objective="attributes", freeze_tower=True)],
     r"data.phases\[0\]: an attributes phase trains only the vision tower"),
])
def test_bad_phases_are_named(phases, message):
    with pytest.raises(ConfigError, match=message):
        Curriculum.from_config(BASE, phases, total_steps=10, lr=1e-3)


def test_phases_load_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("data:\n  phases:\n    - {steps: 3, lr: 0.002, single_object: true, task_weights: {colour: 1}}\n"
                    "    - {steps: 2, task_weights: {shape: 1}}\ntrain: {steps: 5, scheduler: constant}\n")
    config = load_pretrain_config(path)
    assert [phase.steps for phase in config.data.phases] == [3, 2]
    assert config.data.phases[0].single_object and config.data.phases[1].lr is None
    assert config.curriculum().lr_at(4) == pytest.approx(config.train.lr)
    with pytest.raises(ConfigError, match="set train.scheduler: constant"):
        load_pretrain_config(path, ["train.scheduler=cosine"])
    with pytest.raises(ConfigError, match=r"data.phases: unknown key 'step'"):
        load_pretrain_config(path, ["data.phases=[{step: 5, task_weights: {colour: 1}}]"])


def test_a_scaled_phase_draws_the_same_scene_larger():
    import numpy as np

    phases = [CurriculumPhase(steps=2, task_weights={"colour": 1.0}, single_object=True, object_scale=3.0),
              CurriculumPhase(steps=2, task_weights={"colour": 1.0}, single_object=True)]
    stream = iter(CorpusStream(Curriculum.from_config(BASE, phases, total_steps=4, lr=1e-3), global_batch=1))
    scaled, plain = next(stream), [next(stream) for _ in range(2)][-1]
    assert scaled.object_scale == 3.0 and plain.object_scale == 1.0
    unscaled = type(scaled)(scaled.scene, scaled.prompt, scaled.answer, scaled.task, scaled.kind)

    def coloured_pixels(image) -> int:
        return int((np.asarray(image) < 250).any(axis=-1).sum())

    assert coloured_pixels(scaled.image(112)) > 4 * coloured_pixels(unscaled.image(112)) > 0
    with pytest.raises(ConfigError, match=r"data.phases\[0\].object_scale must be within"):
        Curriculum.from_config(BASE, [CurriculumPhase(steps=4, task_weights={"colour": 1.0}, object_scale=0)],
                               total_steps=4, lr=1e-3)


def test_an_attributes_phase_draws_scenes_and_a_frozen_phase_gives_the_tower_no_lr():
    phases = [CurriculumPhase(steps=2, objective="attributes", single_object=True, lr=2e-3),
              CurriculumPhase(steps=2, task_weights={"colour": 1.0}, freeze_tower=True, lr=1e-3),
              CurriculumPhase(steps=2, task_weights={"colour": 1.0}, lr=5e-4)]
    curriculum = Curriculum.from_config(BASE, phases, total_steps=6, lr=1e-3)
    assert curriculum.uses_attributes
    assert not Curriculum.from_config(BASE, PHASES, total_steps=10, lr=1e-3).uses_attributes
    examples = [example for example, _ in zip(CorpusStream(curriculum, global_batch=2), range(12))]
    scenes, questions = examples[:4], examples[4:]
    assert {e.task for e in scenes} == {"attributes"} and all(len(e.scene.objects) == 1 for e in scenes)
    assert all(e.prompt == "" and e.answer == "" for e in scenes)
    assert {e.task for e in questions} == {"colour"}
    tower, rest = curriculum.tower_lr_scale(1e-3), curriculum.lr_scale(1e-3)
    assert [tower(step) for step in range(6)] == pytest.approx([2, 2, 0, 0, 0.5, 0.5])
    assert [rest(step) for step in range(6)] == pytest.approx([2, 2, 1, 1, 0.5, 0.5])
