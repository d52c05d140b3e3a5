"""The pre-training corpus: what it asks, that its answers are true, and that its scenes never
meet the demo's evaluation subsets (nor its own held-out split)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from rematch.world.tasks import TASKS, generate_eval_rows
from rematch.world.scenes import layout_split, scene_from_dict
from rematch.world.pretrain_corpus import (
    FOIL_KINDS,
    LAYOUT_HALF,
    QUESTION_TYPES,
    IMAGE_MARK,
    CorpusError,
    CorpusSpec,
    example_rng,
    heldout_examples,
    make_example,
    normalise_answer,
)
from rematch.world.scenes import Description, ObjectSpec, describes


def _scenes_of_eval_rows(rows: list[dict]) -> set:
    """Every scene an evaluation row shows: query, candidates, crops' source scenes."""
    found = set()
    for row in rows:
        for blob in [row["qry_scene"], *row["tgt_scene"]]:
            data = json.loads(blob)
            if data["kind"] == "scene":
                found.add(scene_from_dict(data))
            elif data["kind"] == "crop":
                found.add(scene_from_dict(data["scene"]))
    return found


def test_pretraining_scenes_never_appear_in_the_demo_evaluation_subsets():
    eval_scenes = set()
    for task in TASKS:
        eval_scenes |= _scenes_of_eval_rows(generate_eval_rows(task, n_queries=40, n_candidates=20, seed=0).rows[task])
    assert len(eval_scenes) > 300
    pretrain = [make_example(CorpusSpec(split="pretrain", seed=seed), index)
                for seed in (0, 1) for index in range(400)]
    # Structural: every pre-training scene lies in the train half of all layouts, every
    # evaluation scene (queries, candidates, hard negatives, crops) in the test half.
    assert {layout_split(example.scene) for example in pretrain} == {LAYOUT_HALF["pretrain"]}
    assert {layout_split(scene) for scene in eval_scenes} == {"test"}
    assert not {example.scene for example in pretrain} & eval_scenes


def test_heldout_split_is_disjoint_from_pretraining_and_has_its_own_seed_stream():
    pretrain = {make_example(CorpusSpec(split="pretrain"), index).scene for index in range(300)}
    heldout = {make_example(CorpusSpec(split="heldout"), index).scene for index in range(300)}
    assert {layout_split(scene) for scene in heldout} == {LAYOUT_HALF["heldout"]}
    assert not pretrain & heldout
    assert example_rng("pretrain", 0, 7).random() != example_rng("heldout", 0, 7).random()
    assert example_rng("pretrain", 0, 7).random() != example_rng("pretrain", 1, 7).random()


def test_examples_are_a_pure_function_of_split_seed_and_index():
    spec = CorpusSpec(split="pretrain", seed=3)
    assert [make_example(spec, i) for i in (5, 1, 9)] == [make_example(spec, i) for i in (5, 1, 9)]
    assert make_example(spec, 5) != make_example(CorpusSpec(split="pretrain", seed=4), 5)


def test_every_task_is_asked_and_every_answer_is_true_of_its_scene():
    examples = [make_example(CorpusSpec(), index) for index in range(600)]
    assert {example.task for example in examples} == {"caption", *QUESTION_TYPES, "verify"}
    for example in examples:
        objects = example.scene.objects
        if example.task == "colour":
            shape = example.prompt.removeprefix("What colour is the ").removesuffix("?")
            assert [o.colour for o in objects if o.shape == shape] == [example.answer]
        elif example.task == "shape":
            colour = example.prompt.removeprefix("What shape is the ").removesuffix(" object?")
            assert [o.shape for o in objects if o.colour == colour] == [example.answer]
        elif example.task == "count" and example.kind == "objects":
            assert example.answer == ("zero", "one", "two", "three")[len(objects)]
        elif example.task == "caption":
            assert len(objects) <= 2 and example.answer.startswith("a ")


def test_verification_is_balanced_and_its_foils_are_false():
    spec = CorpusSpec(task_weights={"verify": 1.0})
    examples = [make_example(spec, index) for index in range(600)]
    answers = Counter(example.answer for example in examples)
    assert abs(answers["Yes"] - answers["No"]) < 0.12 * len(examples)
    assert {example.kind for example in examples if example.answer == "No"} == set(FOIL_KINDS)
    for example in examples:
        caption = example.prompt.split("? ", 1)[1].rsplit(" Answer only", 1)[0]
        assert describes(_parse(caption), example.scene) == (example.answer == "Yes"), example


def _parse(caption: str) -> Description:
    words = caption.split()
    first = ObjectSpec(words[2], words[3], words[1])
    if len(words) == 4:
        return Description((first,))
    relation_words = words[4:-4]
    second = ObjectSpec(words[-2], words[-1], words[-3])
    return Description((first, second), " ".join(relation_words))


def test_curriculum_phases_keep_objects_large_and_scenes_single():
    examples = [make_example(CorpusSpec(), index, large_only=True) for index in range(200)]
    assert {obj.size for example in examples for obj in example.scene.objects} == {"large"}
    assert {len(example.scene.objects) for example in examples} == {1, 2, 3}
    single = [make_example(CorpusSpec(), index, single_object=True) for index in range(200)]
    assert {len(example.scene.objects) for example in single if example.task != "relation"} == {1}
    assert {len(example.scene.objects) for example in single if example.task == "relation"} == {2}
    assert {example.task for example in single} >= {"colour", "shape", "verify", "caption"}


def test_bad_corpus_settings_are_named():
    with pytest.raises(CorpusError, match="unknown corpus split 'test'"):
        CorpusSpec(split="test").validate()
    with pytest.raises(CorpusError, match="unknown corpus tasks"):
        CorpusSpec(task_weights={"colours": 1.0}).validate()
    with pytest.raises(CorpusError, match="positive sum"):
        CorpusSpec(task_weights={"colour": 0.0}).validate()
    with pytest.raises(CorpusError, match="unknown image position 'middle'; choose one of first, last, mixed"):
        CorpusSpec(image_position="middle").validate()
    with pytest.raises(ValueError, match="first or last"):
        heldout_examples(1, image_position="mixed")


def test_the_image_position_moves_the_image_and_nothing_else():
    """``last`` puts the image's mark after the question, ``mixed`` draws it per example (about
    half), and under every setting example i has the same scene, question and answer."""
    first, last, mixed = ([make_example(CorpusSpec(image_position=where), i) for i in range(200)]
                          for where in ("first", "last", "mixed"))
    for a, b, c in zip(first, last, mixed):
        assert (a.scene, a.prompt, a.answer, a.kind) == (b.scene, b.prompt, b.answer, b.kind) == \
            (c.scene, c.prompt, c.answer, c.kind)
        assert a.text == a.prompt and not a.image_last
        assert b.image_last and b.text == f"{b.prompt}\n{IMAGE_MARK}"
    assert 70 <= sum(c.image_last for c in mixed) <= 130
    assert [c.image_last for c in mixed] == [make_example(CorpusSpec(image_position="mixed"), i).image_last
                                             for i in range(200)]
    held = heldout_examples(2, image_position="last")
    assert all(e.image_last for e in held) and [e.prompt for e in held] == [e.prompt for e in heldout_examples(2)]


def test_answers_are_normalised_for_exact_match():
    assert normalise_answer("  Red. ") == normalise_answer("red") == "red"
    assert normalise_answer("left  of") == "left of"
