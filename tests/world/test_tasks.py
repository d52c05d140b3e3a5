"""The built-in shapes world: determinism, train/test disjointness, and hard negatives that
differ from the positive in exactly the stated way (checked on the scene graph)."""

from __future__ import annotations

import hashlib
import json
import random
import time

import pytest

from rematch.data.mmeb_subsets import read_manifest_subsets, subset_info
from rematch.world.tasks import (
    ANSWERS,
    LABELS,
    TASKS,
    answer_question,
    generate_eval_rows,
    generate_train_rows,
    write_shapes_dataset,
)
from rematch.world.scenes import (
    COLOURS,
    OPPOSITE,
    PERTURBATIONS,
    Description,
    Scene,
    ShapeObject,
    box_contains,
    caption,
    describe,
    describes,
    layout_split,
    perturb_scene,
    random_scene,
    render,
    scene_from_dict,
    scene_is_valid,
)


def _scene(data: str | dict) -> Scene:
    data = json.loads(data) if isinstance(data, str) else data
    return scene_from_dict(data)


def _description(data: str) -> Description:
    return Description.from_dict(json.loads(data))


@pytest.fixture(scope="module")
def train_rows():
    return generate_train_rows(400, seed=7).rows


# ---------------------------------------------------------------------- the world


def test_captions_and_relations_follow_the_scene_graph():
    scene = Scene((ShapeObject("blue", "star", "small", 0.25, 0.5), ShapeObject("green", "square", "large", 0.75, 0.5)))
    assert caption(scene) == describe(scene).text == "a small blue star left of a large green square"
    assert describes(describe(scene), scene)
    flipped = perturb_scene(scene, "reverse_relation", random.Random(0))
    assert caption(flipped) == "a small blue star right of a large green square"
    assert not describes(describe(scene), flipped)


def test_rendered_objects_have_their_colour_at_their_centre():
    rng = random.Random(0)
    for _ in range(20):
        scene = random_scene(rng, rng.choice((1, 2, 3)))
        image = render(scene, 112)
        for obj in scene.objects:
            assert image.getpixel((int(obj.x * 112), int(obj.y * 112))) == COLOURS[obj.colour]
        assert image.getpixel((0, 0)) == (255, 255, 255)  # white background


def test_random_scenes_are_valid_and_respect_the_requested_split():
    rng = random.Random(1)
    for split in ("train", "test"):
        for _ in range(50):
            scene = random_scene(rng, rng.choice((1, 2, 3)), split)
            assert scene_is_valid(scene) and layout_split(scene) == split


def test_a_written_world_declares_its_subsets_in_its_manifest(tmp_path):
    root = write_shapes_dataset(tmp_path / "w", 10, 2, seed=0, num_candidates=8, image_size=56)
    declared = read_manifest_subsets(root)
    assert {name: subset_info(name, declared).meta_task for name in TASKS} == {
        "ShapesCLS": "classification", "ShapesVQA": "vqa", "ShapesT2I": "retrieval", "ShapesI2T": "retrieval",
        "ShapesGround": "grounding"}
    assert all(subset_info(name, declared).split == "IND" for name in TASKS)
    # nothing is registered by importing the world: without the manifest a shapes subset is unknown
    assert subset_info("ShapesCLS").meta_task == "other" and read_manifest_subsets(tmp_path) == {}


# ---------------------------------------------------------------------- rows in MMEB's formats


def test_rows_use_mmeb_instruction_strings(train_rows):
    assert {row["qry"] for row in train_rows["ShapesCLS"]} == {
        "<|image_1|>\nRepresent the given image for classification\n"}
    assert all(row["qry"].startswith("Find me an everyday image that matches the given caption: ")
               and row["pos_text"] == "<|image_1|>\nRepresent the given image.\n" for row in train_rows["ShapesT2I"])
    assert {row["qry"] for row in train_rows["ShapesI2T"]} == {
        "<|image_1|>\nFind an image caption describing the given everyday image.\n"}
    assert all(row["qry"].startswith("<|image_1|>\nRepresent the given image with the following question: ")
               for row in train_rows["ShapesVQA"])
    assert all(row["qry"].startswith("<|image_1|>\nSelect the portion of the image that isolates the ")
               for row in train_rows["ShapesGround"])
    evaluation = generate_eval_rows("ShapesT2I", 2, 10, seed=0).rows["ShapesT2I"][0]
    assert evaluation["tgt_text"][0] == "<|image_1|> Represent the given image."
    classification = generate_eval_rows("ShapesCLS", 2, 10, seed=0).rows["ShapesCLS"][0]
    assert classification["qry_text"] == "<|image_1|> Represent the given image for classification"


def test_generation_is_deterministic_given_the_seed():
    first, again, other = (generate_train_rows(40, seed=s) for s in (3, 3, 4))
    assert first.rows == again.rows and first.images.keys() == again.images.keys()
    assert first.rows != other.rows
    assert generate_eval_rows("ShapesI2T", 5, 20, seed=3).rows == generate_eval_rows("ShapesI2T", 5, 20, seed=3).rows


def test_written_dataset_is_byte_identical_for_the_same_seed(tmp_path):
    def digest(root):
        return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}

    a = write_shapes_dataset(tmp_path / "a", 20, 3, seed=5, num_candidates=8, image_size=56)
    b = write_shapes_dataset(tmp_path / "b", 20, 3, seed=5, num_candidates=8, image_size=56)
    assert digest(a) == digest(b) and len(digest(a)) > 20


def _all_scenes(rows: list[dict]) -> set[Scene]:
    """Every scene a row shows or crops, on any side, as a scene graph."""
    found = set()
    for row in rows:
        values = [row.get(k) for k in ("qry_scene", "pos_scene", "neg_scene")] + list(row.get("tgt_scene", []))
        for value in values:
            if not value:
                continue
            data = json.loads(value)
            if data["kind"] == "scene":
                found.add(_scene(data))
            elif data["kind"] == "crop":
                found.add(_scene(data["scene"]))
    return found


def test_train_and_eval_never_share_a_scene(train_rows):
    train = _all_scenes([row for rows in train_rows.values() for row in rows])
    evaluation = set()
    for seed in (7, 8):
        for task in TASKS:
            evaluation |= _all_scenes(generate_eval_rows(task, 10, 20, seed=seed).rows[task])
    assert len(train) > 300 and len(evaluation) > 300
    assert not train & evaluation
    # ... nor even a layout: the two halves of the position space are disjoint.
    assert {layout_split(s) for s in train} == {"train"} and {layout_split(s) for s in evaluation} == {"test"}


# ---------------------------------------------------------------------- hard negatives (scene graph)


def _object_diffs(a: Scene, b: Scene) -> list[tuple[int, str]]:
    return [(i, attr) for i, (x, y) in enumerate(zip(a.objects, b.objects))
            for attr in ("colour", "shape", "size", "x", "y") if getattr(x, attr) != getattr(y, attr)]


def _assert_scene_perturbation(kind: str, positive: Scene, negative: Scene) -> None:
    assert len(positive.objects) == len(negative.objects)
    diffs = _object_diffs(positive, negative)
    p, n = positive.objects, negative.objects
    if kind == "swap_colours":
        assert diffs == [(0, "colour"), (1, "colour")]
        assert (n[0].colour, n[1].colour) == (p[1].colour, p[0].colour)
    elif kind == "reverse_relation":
        assert {d for d in diffs if d[1] in ("colour", "shape", "size")} == set()
        assert ((n[0].x, n[0].y), (n[1].x, n[1].y)) == ((p[1].x, p[1].y), (p[0].x, p[0].y))
        assert all(i in (0, 1) for i, _ in diffs)
        assert negative.relation(0, 1) == OPPOSITE[positive.relation(0, 1)]
    else:
        attribute = kind.removeprefix("replace_")
        assert len(diffs) == 1 and diffs[0][1] == attribute and diffs[0][0] in (0, 1)


def _assert_description_perturbation(kind: str, positive: Description, negative: Description) -> None:
    p, n = positive.objects, negative.objects
    diffs = [(i, attr) for i, (x, y) in enumerate(zip(p, n)) for attr in ("colour", "shape", "size")
             if getattr(x, attr) != getattr(y, attr)]
    if kind == "swap_colours":
        assert diffs == [(0, "colour"), (1, "colour")] and (n[0].colour, n[1].colour) == (p[1].colour, p[0].colour)
        assert negative.relation == positive.relation
    elif kind == "reverse_relation":
        assert diffs == [] and negative.relation == OPPOSITE[positive.relation]
    else:
        attribute = kind.removeprefix("replace_")
        assert len(diffs) == 1 and diffs[0][1] == attribute and negative.relation == positive.relation


def test_text_to_image_negatives_change_exactly_the_stated_thing(train_rows):
    kinds = set()
    for row in train_rows["ShapesT2I"]:
        description, positive, negative = (_description(row["qry_scene"]), _scene(row["pos_scene"]),
                                           _scene(row["neg_scene"]))
        assert row["qry"].endswith(description.text + "\n") and description == describe(positive)
        _assert_scene_perturbation(row["neg_kind"], positive, negative)
        assert describes(description, positive) and not describes(description, negative)
        assert row["pos_image_path"] != row["neg_image_path"]
        kinds.add(row["neg_kind"])
    assert kinds == set(PERTURBATIONS)


def test_image_to_text_negatives_change_exactly_the_stated_thing(train_rows):
    kinds = set()
    for row in train_rows["ShapesI2T"]:
        scene, positive, negative = _scene(row["qry_scene"]), _description(row["pos_scene"]), _description(
            row["neg_scene"])
        assert row["pos_text"] == positive.text and row["neg_text"] == negative.text
        _assert_description_perturbation(row["neg_kind"], positive, negative)
        assert describes(positive, scene) and not describes(negative, scene)
        kinds.add(row["neg_kind"])
    assert kinds == set(PERTURBATIONS)


def test_classification_vqa_and_grounding_negatives_are_wrong_for_the_scene(train_rows):
    for row in train_rows["ShapesCLS"]:
        (obj,) = _scene(row["qry_scene"]).objects
        assert row["pos_text"] == f"{obj.colour} {obj.shape}" and row["neg_text"] in LABELS
        positive, negative = _description(row["pos_scene"]), _description(row["neg_scene"])
        _assert_description_perturbation(row["neg_kind"], positive, negative)
    vqa_kinds = set()
    for row in train_rows["ShapesVQA"]:
        query = json.loads(row["qry_scene"])
        question, scene = query["question"], _scene(query)
        assert answer_question(scene, question) == row["pos_text"] != row["neg_text"]
        assert row["neg_text"] in ANSWERS[question["type"]]
        if question["type"] == "relation":
            assert row["neg_kind"] == "reverse_relation" and row["neg_text"] == OPPOSITE[row["pos_text"]]
        vqa_kinds.add(question["type"])
    assert vqa_kinds == set(ANSWERS)
    ground_kinds = set()
    for row in train_rows["ShapesGround"]:
        query, positive, negative = (json.loads(row[k]) for k in ("qry_scene", "pos_scene", "neg_scene"))
        scene, target = _scene(query), query["target"]
        centre = scene.objects[target]
        assert row["qry"].endswith(f"isolates the {centre.colour} {centre.shape}\n")
        assert positive["object"] == target and box_contains(positive["box"], centre.x, centre.y)
        assert not box_contains(negative["box"], centre.x, centre.y)
        if row["neg_kind"] == "other_object":
            other = scene.objects[negative["object"]]
            assert negative["object"] != target and box_contains(negative["box"], other.x, other.y)
        ground_kinds.add(row["neg_kind"])
    assert ground_kinds == {"other_object", "random_crop"}


def test_eval_candidates_put_the_correct_target_first_and_never_a_second_match():
    for task in TASKS:
        rows = generate_eval_rows(task, 6, 20, seed=1).rows[task]
        for row in rows:
            assert len(row["tgt_text"]) == len(row["tgt_img_path"]) == len(row["tgt_kind"]) == 20
            assert row["tgt_kind"][0] == "positive" and row["tgt_kind"].count("positive") == 1
            pairs = list(zip(row["tgt_text"], row["tgt_img_path"]))
            assert len(set(pairs)) == len(pairs)
            if task == "ShapesT2I":
                description = _description(row["qry_scene"])
                matches = [describes(description, _scene(s)) for s in row["tgt_scene"]]
                assert matches[0] and not any(matches[1:])
                assert {"swap_colours", "reverse_relation"} & set(row["tgt_kind"]) or \
                    len(description.objects) == 1
            if task == "ShapesI2T":
                scene = _scene(row["qry_scene"])
                assert [describes(_description(s), scene) for s in row["tgt_scene"]] == [True] + [False] * 19
    # The label vocabulary bounds classification and VQA candidate lists (as in MMEB).
    assert len(generate_eval_rows("ShapesCLS", 1, 100, seed=0).rows["ShapesCLS"][0]["tgt_text"]) == 24
    assert len(generate_eval_rows("ShapesVQA", 1, 100, seed=0).rows["ShapesVQA"][0]["tgt_text"]) == 20


def test_ten_thousand_training_rows_generate_in_seconds():
    start = time.perf_counter()
    split = generate_train_rows(10_000, seed=0)
    elapsed = time.perf_counter() - start
    assert sum(len(rows) for rows in split.rows.values()) == 10_000
    assert elapsed < 10, f"took {elapsed:.1f}s"
