"""MMEB-style tasks built from the shapes world, written in MMEB's own row formats.

Five subsets mirror MMEB's four meta-tasks (all registered as in-distribution):

============  ==============  ==========================================================
subset        meta-task       query -> target
============  ==============  ==========================================================
ShapesCLS     classification  one-object image -> its "colour shape" label (24 labels)
ShapesVQA     vqa             image + question -> short answer
ShapesT2I     retrieval       caption -> image
ShapesI2T     retrieval       image -> caption
ShapesGround  grounding       image + "isolates the <colour> <shape>" -> the right crop
============  ==============  ==========================================================

Rows carry MMEB's instruction strings and ``<|image_1|>`` placeholders inside the text
(MMEB-train puts a newline after the placeholder, MMEB-eval a space), so a model trained
here meets familiar prompts on real MMEB data and vice versa. Training rows have one
*compositional* hard negative (SugarCrepe-style: colours swapped between the two objects,
relation reversed, or one attribute replaced); evaluation rows rank the correct target
(candidate 0) against all such perturbations plus random distractors.

Extra columns hold the scene graph of every side (``qry_scene``, ``pos_scene``,
``neg_scene`` / ``tgt_scene``, as JSON) and the perturbation's name (``neg_kind`` /
``tgt_kind``), so tests and error analyses check meaning, not pixels. Readers ignore them.

Everything is a pure function of the seed. Train scenes and test scenes come from the two
disjoint halves of all layouts (:func:`rematch.world.scenes.layout_split`), so no scene
(nor any of its hard negatives) is ever in both.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from rematch.data.mmeb_subsets import CLASSIFICATION, GROUNDING, RETRIEVAL, VQA
from rematch.world.scenes import (
    COLOURS,
    OPPOSITE,
    PERTURBATIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Description,
    ObjectSpec,
    Scene,
    box_contains,
    describe,
    describes,
    layout_split,
    object_box,
    perturb_description,
    perturb_scene,
    random_box,
    random_scene,
    render,
    scene_to_dict,
)

TASKS: dict[str, str] = {
    "ShapesCLS": CLASSIFICATION,
    "ShapesVQA": VQA,
    "ShapesT2I": RETRIEVAL,
    "ShapesI2T": RETRIEVAL,
    "ShapesGround": GROUNDING,
}

TRAIN_SPLIT, EVAL_SPLIT = "train", "test"

# MMEB's instruction strings. Train rows follow MMEB-train ("<|image_1|>\n...\n"), eval
# rows MMEB-eval ("<|image_1|> ..."); `_eval_text` converts one form into the other.
CLS_QUERY = "<|image_1|>\nRepresent the given image for classification\n"
VQA_QUERY = "<|image_1|>\nRepresent the given image with the following question: {question}\n"
T2I_QUERY = "Find me an everyday image that matches the given caption: {caption}\n"
I2T_QUERY = "<|image_1|>\nFind an image caption describing the given everyday image.\n"
GROUND_QUERY = "<|image_1|>\nSelect the portion of the image that isolates the {colour} {shape}\n"
IMAGE_TARGET = "<|image_1|>\nRepresent the given image.\n"
CROP_TARGET = "<|image_1|>\nRepresent the given cropped image of the object\n"

COUNT_WORDS = ("zero", "one", "two", "three")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
#: Every VQA answer, by question type.
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "size": tuple(SIZES),
    "relation": RELATIONS,
}
#: The hard-negative name of a wrong answer of each question type.
ANSWER_PERTURBATION = {"colour": "replace_colour", "shape": "replace_shape", "count": "replace_count",
                       "size": "replace_size", "relation": "reverse_relation"}
LABELS = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)


def _eval_text(train_text: str) -> str:
    """MMEB-train text -> MMEB-eval text: "<|image_1|>\\nX\\n" -> "<|image_1|> X"."""
    return train_text.replace("<|image_1|>\n", "<|image_1|> ").rstrip("\n")


# ====================================================================== images a row refers to


@dataclass(frozen=True)
class ImageSpec:
    """What an image file shows: a scene, or the part of a scene inside ``box``."""

    scene: Scene
    box: tuple[float, float, float, float] | None = None

    @property
    def path(self) -> str:
        """Content-addressed path relative to the dataset root (same content, same file)."""
        key = json.dumps([scene_to_dict(self.scene), self.box], sort_keys=True)
        digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
        kind = "crops" if self.box is not None else "scenes"
        return f"images/{layout_split(self.scene)}/{kind}/{digest}.png"

    def render(self, side: int, full: Image.Image | None = None) -> Image.Image:
        image = full if full is not None else render(self.scene, side)
        if self.box is None:
            return image
        x0, y0, x1, y1 = self.box
        return image.crop((round(x0 * side), round(y0 * side), round(x1 * side), round(y1 * side)))


@dataclass
class ShapesSplit:
    """Generated rows per subset, plus every image they refer to (rendered when written)."""

    rows: dict[str, list[dict]] = field(default_factory=dict)
    images: dict[str, ImageSpec] = field(default_factory=dict)

    def image(self, spec: ImageSpec) -> str:
        path = spec.path
        self.images[path] = spec
        return path

    def merge(self, other: "ShapesSplit") -> "ShapesSplit":
        for subset, rows in other.rows.items():
            self.rows.setdefault(subset, []).extend(rows)
        self.images.update(other.images)
        return self


def _json(data: dict) -> str:
    return json.dumps(data, sort_keys=True)


def _scene_json(scene: Scene, **extra) -> str:
    return _json({"kind": "scene", **scene_to_dict(scene), **extra})


def _description_json(description: Description) -> str:
    return _json({"kind": "description", **description.to_dict()})


def _crop_json(scene: Scene, box, obj: int | None) -> str:
    return _json({"kind": "crop", "scene": scene_to_dict(scene), "box": list(box), "object": obj})


def _answer_json(question: dict, answer: str) -> str:
    return _json({"kind": "answer", "question": question, "answer": answer})


def _rng(split: str, task: str, seed: int) -> random.Random:
    return random.Random(f"rematch-shapes/{split}/{task}/{seed}")


def _n_objects(rng: random.Random, weights: Sequence[float]) -> int:
    return rng.choices((1, 2, 3), weights=weights)[0]


# ====================================================================== VQA questions


def make_question(scene: Scene, rng: random.Random) -> tuple[dict, str, str] | None:
    """A random unambiguous question about ``scene``: (question dict, text, answer), or None."""
    kind = rng.choice(tuple(ANSWERS))
    objects = scene.objects
    if kind == "colour":
        question = {"type": "colour", "shape": rng.choice(SHAPES)}
        text = f"What colour is the {question['shape']}?"
    elif kind == "count":
        question = {"type": "count", "shape": rng.choice(SHAPES)}
        text = f"How many {PLURALS[question['shape']]} are there?"
    elif kind == "size":
        obj = rng.choice(objects)
        question = {"type": "size", "colour": obj.colour, "shape": obj.shape}
        text = f"What size is the {obj.colour} {obj.shape}?"
    elif kind == "shape":
        if len(objects) < 2:
            return None
        ref = rng.choice(objects)
        question = {"type": "shape", "relation": rng.choice(RELATIONS),
                    "reference": {"colour": ref.colour, "shape": ref.shape}}
        text = f"What shape is {question['relation']} the {ref.colour} {ref.shape}?"
    else:  # relation
        if len(objects) < 2:
            return None
        first, second = rng.sample(objects, 2)
        question = {"type": "relation", "subject": {"colour": first.colour, "shape": first.shape},
                    "reference": {"colour": second.colour, "shape": second.shape}}
        text = (f"Where is the {first.colour} {first.shape} relative to the "
                f"{second.colour} {second.shape}?")
    answer = answer_question(scene, question)
    return (question, text, answer) if answer is not None else None


def answer_question(scene: Scene, question: dict) -> str | None:
    """The answer the scene graph gives, or None when the question is ambiguous or moot."""
    objects = scene.objects

    def find(spec: dict) -> int | None:
        hits = [i for i, o in enumerate(objects) if o.colour == spec["colour"] and o.shape == spec["shape"]]
        return hits[0] if len(hits) == 1 else None

    kind = question["type"]
    if kind == "colour":
        hits = [o for o in objects if o.shape == question["shape"]]
        return hits[0].colour if len(hits) == 1 else None
    if kind == "count":
        return COUNT_WORDS[sum(o.shape == question["shape"] for o in objects)]
    if kind == "size":
        index = find(question)
        return objects[index].size if index is not None else None
    if kind == "shape":
        ref = find(question["reference"])
        if ref is None:
            return None
        shapes = {objects[i].shape for i in range(len(objects))
                  if i != ref and scene.relation(i, ref) == question["relation"]}
        return shapes.pop() if len(shapes) == 1 else None
    if kind == "relation":
        subject, ref = find(question["subject"]), find(question["reference"])
        return scene.relation(subject, ref) if subject is not None and ref is not None else None
    raise ValueError(f"unknown question type {kind!r}")


# ====================================================================== one task per builder


class _Task:
    """One subset: how to make a training row (with one hard negative) and an evaluation row."""

    name: str

    def train_row(self, rng: random.Random, out: ShapesSplit) -> dict:
        raise NotImplementedError

    def eval_row(self, rng: random.Random, n_candidates: int, out: ShapesSplit) -> dict:
        raise NotImplementedError


def _eval_row(query_text: str, query_image: str, query_scene: str,
              candidates: list[tuple[str, str, str, str]]) -> dict:
    """MMEB-eval row from (text, image path, scene json, kind) candidates; the first is correct."""
    return {
        "qry_text": _eval_text(query_text),
        "qry_img_path": query_image,
        "tgt_text": [_eval_text(text) for text, _, _, _ in candidates],
        "tgt_img_path": [image for _, image, _, _ in candidates],
        "qry_scene": query_scene,
        "tgt_scene": [scene for _, _, scene, _ in candidates],
        "tgt_kind": [kind for _, _, _, kind in candidates],
    }


class _Classification(_Task):
    name = "ShapesCLS"

    def train_row(self, rng, out):
        scene = random_scene(rng, 1, TRAIN_SPLIT)
        label = Description((ObjectSpec(scene.objects[0].colour, scene.objects[0].shape),))
        kind = rng.choice(("replace_colour", "replace_shape"))
        negative = perturb_description(label, kind, rng)
        return {"qry": CLS_QUERY, "qry_image_path": out.image(ImageSpec(scene)), "pos_text": label.label,
                "pos_image_path": "", "neg_text": negative.label, "neg_image_path": "",
                "qry_scene": _scene_json(scene), "pos_scene": _description_json(label),
                "neg_scene": _description_json(negative), "neg_kind": kind}

    def eval_row(self, rng, n_candidates, out):
        scene = random_scene(rng, 1, EVAL_SPLIT)
        obj = scene.objects[0]
        correct = f"{obj.colour} {obj.shape}"
        others = [label for label in LABELS if label != correct]
        rng.shuffle(others)
        candidates = []
        for label in [correct] + others[:max(0, n_candidates - 1)]:
            colour, shape = label.split(" ")
            kind = ("positive" if label == correct else "replace_colour" if shape == obj.shape
                    else "replace_shape" if colour == obj.colour else "other")
            candidates.append((label, "", _description_json(Description((ObjectSpec(colour, shape),))), kind))
        return _eval_row(CLS_QUERY, out.image(ImageSpec(scene)), _scene_json(scene), candidates)


class _VisualQuestions(_Task):
    name = "ShapesVQA"

    def _question(self, rng, split):
        while True:
            scene = random_scene(rng, _n_objects(rng, (1, 2, 2)), split)
            made = make_question(scene, rng)
            if made is not None:
                return scene, made

    @staticmethod
    def _kind(question_type: str, answer: str, wrong: str, same_type: Sequence[str]) -> str:
        if wrong not in same_type:
            return "other"
        if question_type == "relation" and wrong != OPPOSITE[answer]:
            return "replace_relation"
        return ANSWER_PERTURBATION[question_type]

    def train_row(self, rng, out):
        scene, (question, text, answer) = self._question(rng, TRAIN_SPLIT)
        kind = question["type"]
        wrong = OPPOSITE[answer] if kind == "relation" else rng.choice([a for a in ANSWERS[kind] if a != answer])
        return {"qry": VQA_QUERY.format(question=text), "qry_image_path": out.image(ImageSpec(scene)),
                "pos_text": answer, "pos_image_path": "", "neg_text": wrong, "neg_image_path": "",
                "qry_scene": _scene_json(scene, question=question), "pos_scene": _answer_json(question, answer),
                "neg_scene": _answer_json(question, wrong), "neg_kind": ANSWER_PERTURBATION[kind]}

    def eval_row(self, rng, n_candidates, out):
        scene, (question, text, answer) = self._question(rng, EVAL_SPLIT)
        kind = question["type"]
        same_type = [a for a in ANSWERS[kind] if a != answer]
        other_types = [a for k, answers in ANSWERS.items() if k != kind for a in answers]
        rng.shuffle(same_type)
        rng.shuffle(other_types)
        chosen = (same_type + other_types)[:max(0, n_candidates - 1)]
        rng.shuffle(chosen)
        candidates = [(answer, "", _answer_json(question, answer), "positive")]
        candidates += [(a, "", _answer_json(question, a), self._kind(kind, answer, a, same_type)) for a in chosen]
        return _eval_row(VQA_QUERY.format(question=text), out.image(ImageSpec(scene)),
                         _scene_json(scene, question=question), candidates)


def _hard_negative(rng: random.Random, make: Callable[[str], object | None], accept: Callable[[object], bool],
                   kinds: Sequence[str] = PERTURBATIONS, tries: int = 4) -> tuple[str, object] | None:
    """One perturbation, trying the kinds in random order (``replace_*`` gets a few tries)."""
    order = list(kinds)
    rng.shuffle(order)
    for kind in order:
        for _ in range(tries if kind.startswith("replace_") else 1):
            result = make(kind)
            if result is not None and accept(result):
                return kind, result
    return None


def _all_hard_negatives(rng, make, accept, key, per_kind: int = 2) -> list[tuple[str, object]]:
    """Distinct perturbations of every applicable kind (SugarCrepe-style evaluation negatives)."""
    found, seen = [], set()
    for kind in PERTURBATIONS:
        for _ in range(per_kind * 4):
            result = make(kind)
            if result is not None and accept(result) and key(result) not in seen:
                seen.add(key(result))
                found.append((kind, result))
                if sum(k == kind for k, _ in found) >= per_kind:
                    break
    return found


class _TextToImage(_Task):
    name = "ShapesT2I"

    def train_row(self, rng, out):
        while True:
            scene = random_scene(rng, _n_objects(rng, (1, 2, 2)), TRAIN_SPLIT)
            description = describe(scene)
            picked = _hard_negative(rng, partial(perturb_scene, scene, rng=rng),
                                    lambda neg, description=description: not describes(description, neg))
            if picked is not None:
                break
        kind, negative = picked
        return {"qry": T2I_QUERY.format(caption=description.text), "qry_image_path": "",
                "pos_text": IMAGE_TARGET, "pos_image_path": out.image(ImageSpec(scene)),
                "neg_text": IMAGE_TARGET, "neg_image_path": out.image(ImageSpec(negative)),
                "qry_scene": _description_json(description), "pos_scene": _scene_json(scene),
                "neg_scene": _scene_json(negative), "neg_kind": kind}

    def eval_row(self, rng, n_candidates, out):
        scene = random_scene(rng, _n_objects(rng, (1, 2, 2)), EVAL_SPLIT)
        description = describe(scene)
        seen = {scene}
        candidates = [(IMAGE_TARGET, out.image(ImageSpec(scene)), _scene_json(scene), "positive")]
        hard = _all_hard_negatives(rng, lambda kind: perturb_scene(scene, kind, rng),
                                   lambda neg: not describes(description, neg), key=lambda s: s)
        for kind, negative in hard[:max(0, n_candidates - 1)]:
            seen.add(negative)
            candidates.append((IMAGE_TARGET, out.image(ImageSpec(negative)), _scene_json(negative), kind))
        while len(candidates) < n_candidates:
            other = random_scene(rng, _n_objects(rng, (1, 2, 2)), EVAL_SPLIT)
            if other in seen or describes(description, other):
                continue
            seen.add(other)
            candidates.append((IMAGE_TARGET, out.image(ImageSpec(other)), _scene_json(other), "random"))
        return _eval_row(T2I_QUERY.format(caption=description.text), "", _description_json(description),
                         candidates)


class _ImageToText(_Task):
    name = "ShapesI2T"

    def train_row(self, rng, out):
        while True:
            scene = random_scene(rng, _n_objects(rng, (1, 2, 2)), TRAIN_SPLIT)
            description = describe(scene)
            picked = _hard_negative(rng, partial(perturb_description, description, rng=rng),
                                    lambda neg, scene=scene: not describes(neg, scene))
            if picked is not None:
                break
        kind, negative = picked
        return {"qry": I2T_QUERY, "qry_image_path": out.image(ImageSpec(scene)), "pos_text": description.text,
                "pos_image_path": "", "neg_text": negative.text, "neg_image_path": "",
                "qry_scene": _scene_json(scene), "pos_scene": _description_json(description),
                "neg_scene": _description_json(negative), "neg_kind": kind}

    def eval_row(self, rng, n_candidates, out):
        scene = random_scene(rng, _n_objects(rng, (1, 2, 2)), EVAL_SPLIT)
        description = describe(scene)
        seen = {description.text}
        candidates = [(description.text, "", _description_json(description), "positive")]
        hard = _all_hard_negatives(rng, lambda kind: perturb_description(description, kind, rng),
                                   lambda neg: not describes(neg, scene) and neg.text not in seen,
                                   key=lambda d: d.text)
        for kind, negative in hard[:max(0, n_candidates - 1)]:
            seen.add(negative.text)
            candidates.append((negative.text, "", _description_json(negative), kind))
        tries = 0
        while len(candidates) < n_candidates and tries < 100 * n_candidates:
            tries += 1
            other = describe(random_scene(rng, _n_objects(rng, (1, 2, 2)), EVAL_SPLIT))
            if other.text in seen or describes(other, scene):
                continue
            seen.add(other.text)
            candidates.append((other.text, "", _description_json(other), "random"))
        return _eval_row(I2T_QUERY, out.image(ImageSpec(scene)), _scene_json(scene), candidates)


class _Grounding(_Task):
    name = "ShapesGround"

    def _scene(self, rng, split):
        """A 2-3 object scene and a target whose crop holds no other object's centre."""
        while True:
            scene = random_scene(rng, rng.choice((2, 3)), split)
            target = rng.randrange(len(scene.objects))
            box = object_box(scene, target)
            if not any(box_contains(box, o.x, o.y) for i, o in enumerate(scene.objects) if i != target):
                return scene, target, box

    def _query(self, scene, target):
        obj = scene.objects[target]
        return GROUND_QUERY.format(colour=obj.colour, shape=obj.shape)

    def _other_object_boxes(self, scene, target):
        centre = scene.objects[target]
        return [(i, object_box(scene, i)) for i in range(len(scene.objects))
                if i != target and not box_contains(object_box(scene, i), centre.x, centre.y)]

    def _random_box(self, rng, scene, target):
        centre = scene.objects[target]
        while True:
            box = random_box(rng)
            if not box_contains(box, centre.x, centre.y):
                return box

    def train_row(self, rng, out):
        scene, target, box = self._scene(rng, TRAIN_SPLIT)
        others = self._other_object_boxes(scene, target)
        if others and rng.random() < 0.7:
            kind, (neg_object, neg_box) = "other_object", rng.choice(others)
        else:
            kind, neg_object, neg_box = "random_crop", None, self._random_box(rng, scene, target)
        return {"qry": self._query(scene, target), "qry_image_path": out.image(ImageSpec(scene)),
                "pos_text": CROP_TARGET, "pos_image_path": out.image(ImageSpec(scene, box)),
                "neg_text": CROP_TARGET, "neg_image_path": out.image(ImageSpec(scene, neg_box)),
                "qry_scene": _scene_json(scene, target=target), "pos_scene": _crop_json(scene, box, target),
                "neg_scene": _crop_json(scene, neg_box, neg_object), "neg_kind": kind}

    def eval_row(self, rng, n_candidates, out):
        scene, target, box = self._scene(rng, EVAL_SPLIT)
        candidates = [(CROP_TARGET, out.image(ImageSpec(scene, box)), _crop_json(scene, box, target), "positive")]
        seen = {box}
        for index, other in self._other_object_boxes(scene, target):
            if len(candidates) < n_candidates and other not in seen:
                seen.add(other)
                candidates.append((CROP_TARGET, out.image(ImageSpec(scene, other)), _crop_json(scene, other, index),
                                   "other_object"))
        tries = 0
        while len(candidates) < n_candidates and tries < 100 * n_candidates:
            tries += 1
            other = self._random_box(rng, scene, target)
            if other in seen:
                continue
            seen.add(other)
            candidates.append((CROP_TARGET, out.image(ImageSpec(scene, other)), _crop_json(scene, other, None),
                               "random_crop"))
        return _eval_row(self._query(scene, target), out.image(ImageSpec(scene)), _scene_json(scene, target=target),
                         candidates)


TASK_BUILDERS: dict[str, _Task] = {task.name: task for task in
                                   (_Classification(), _VisualQuestions(), _TextToImage(), _ImageToText(),
                                    _Grounding())}


# ====================================================================== public generators


def generate_train_rows(n: int, seed: int = 0, tasks: Sequence[str] | None = None) -> ShapesSplit:
    """``n`` MMEB-train rows (each with one hard negative), spread evenly over ``tasks``."""
    tasks = _check_tasks(tasks)
    out = ShapesSplit({task: [] for task in tasks})
    for position, task in enumerate(tasks):
        count = n // len(tasks) + (1 if position < n % len(tasks) else 0)
        rng = _rng(TRAIN_SPLIT, task, seed)
        out.rows[task] = [TASK_BUILDERS[task].train_row(rng, out) for _ in range(count)]
    return out


def generate_eval_rows(task: str, n_queries: int, n_candidates: int = 100, seed: int = 0) -> ShapesSplit:
    """``n_queries`` MMEB-eval rows of one task; candidate 0 is correct.

    Classification and VQA rank against their whole label/answer vocabulary (24 and 20),
    so they have ``min(n_candidates, vocabulary)`` candidates, as MMEB's classification
    subsets rank against their class list.
    """
    (task,) = _check_tasks([task])
    if n_candidates < 2:
        raise ValueError(f"n_candidates must be >= 2, got {n_candidates}")
    out = ShapesSplit({task: []})
    rng = _rng(EVAL_SPLIT, task, seed)
    out.rows[task] = [TASK_BUILDERS[task].eval_row(rng, n_candidates, out) for _ in range(n_queries)]
    return out


def _check_tasks(tasks: Sequence[str] | None) -> list[str]:
    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown shapes task(s) {unknown}; expected some of {list(TASKS)}")
    return tasks


# ====================================================================== writing to disk


#: Bounds of write_shapes_dataset's sizes: MMEB ranks 1,000 candidates per query; an image side
#: below one 28-pixel Qwen-VL patch cannot be drawn legibly, one above 2,048 only costs memory.
MAX_CANDIDATES = 1000
IMAGE_SIZE_RANGE = (28, 2048)
GENERATOR = "rematch shapes world"


def write_shapes_dataset(out_dir: str | os.PathLike, train_rows: int, eval_queries: int, seed: int = 0,
                         num_candidates: int = 100, fmt: str = "jsonl", image_size: int = 112,
                         tasks: Sequence[str] | None = None, row_group_size: int = 1024,
                         overwrite: bool = False, video_clips: int = 0, pages: int = 0, frame_size: int = 56,
                         video_mp4: bool = False) -> Path:
    """Write the shapes world in MMEB layout and return ``out_dir``::

        OUT/<Subset>/train.jsonl|parquet   MMEB-train schema (+ scene-graph columns)
        OUT/<Subset>/test.jsonl|parquet    MMEB-eval schema (+ scene-graph columns)
        OUT/images/<split>/{scenes,crops}/<hash>.png
        OUT/manifest.json                  what was generated, with which settings
        OUT/video-tasks/, OUT/visdoc-tasks/  with ``video_clips`` / ``pages`` > 0: the video clips
                                           and page images in MMEB-V2's layouts
                                           (:mod:`rematch.world.video_clips`, :mod:`rematch.world.pages`)

    Image paths in rows are relative to OUT, so ``OUT`` is both the data root and the image root.
    ``OUT`` is written as a whole (a temporary sibling renamed into place): it must be new, empty
    or an earlier shapes world holding nothing but the world (which is replaced); a folder of
    anything else, or a world with the user's own subset in it, is refused, ``overwrite`` or not
    (writing into it once overwrote a ``manifest.json`` of the user's, replacing it deleted their
    subset). The manifest holds no timing, so the same command writes the same world, a rerun
    after ``kill -9`` included (the killed write's temporary folder is removed first).
    """
    from rematch.atomic import check_path_length, check_replaceable, write_directory_atomically

    check_shapes_sizes(train_rows, eval_queries, num_candidates, image_size, fmt)
    _check_v2_sizes(video_clips, pages, frame_size, video_mp4)
    tasks = _check_tasks(tasks)
    target = check_path_length(Path(out_dir), "--out").absolute()  # "." has no name to write a sibling under
    what = "a shapes world (rematch data synth)"
    own = _world_entries(target)
    check_replaceable(target, _is_shapes_world, what, overwrite, own)  # before the work, not after it
    write_directory_atomically(target, partial(_write_world, train_rows=train_rows, eval_queries=eval_queries,
                                               seed=seed, num_candidates=num_candidates, fmt=fmt,
                                               image_size=image_size, tasks=tasks, row_group_size=row_group_size,
                                               video_clips=video_clips, pages=pages, frame_size=frame_size,
                                               video_mp4=video_mp4),
                               is_ours=_is_shapes_world, what=what, overwrite=overwrite, own_entry=own)
    return Path(out_dir)


#: The top-level entries of a shapes world besides its subset folders.
WORLD_ENTRIES = frozenset({"manifest.json", "images", "video-tasks", "visdoc-tasks"})


def _world_entries(directory: Path):
    """``own_entry`` of a world folder: its fixed entries and the subsets its manifest lists. A
    folder of the user's inside a world (their own subset) is none of them, so replacing the
    world is refused instead of deleting it."""
    listed: set[str] = set()
    if _is_shapes_world(directory):
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        listed = {str(name) for name in manifest.get("subsets", {})}
    return lambda name: name in WORLD_ENTRIES or name in listed


def check_shapes_sizes(train_rows: int, eval_queries: int, num_candidates: int, image_size: int,
                       fmt: str = "jsonl") -> None:
    """Refuse sizes that cannot make a usable world, before anything is generated."""
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"fmt must be 'jsonl' or 'parquet', got {fmt!r}")
    for name, value in (("train_rows", train_rows), ("eval_queries", eval_queries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if train_rows == 0 and eval_queries == 0:
        raise ValueError("train_rows and eval_queries are both 0: the world would be empty")
    if eval_queries and not 2 <= num_candidates <= MAX_CANDIDATES:
        raise ValueError(f"num_candidates (--candidates) must be within 2..{MAX_CANDIDATES}, got {num_candidates!r}")
    low, high = IMAGE_SIZE_RANGE
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not low <= image_size <= high:
        raise ValueError(f"image_size (--image-size) must be within {low}..{high} pixels, got {image_size!r}")


def _check_v2_sizes(video_clips: int, pages: int, frame_size: int, video_mp4: bool) -> None:
    from rematch.world.pages import PAGE_SIZE, check_page_sizes
    from rematch.world.video_clips import check_video_sizes, require_av

    check_video_sizes(video_clips, frame_size)
    check_page_sizes(pages, PAGE_SIZE)
    if video_mp4 and video_clips:
        require_av()


def _is_shapes_world(directory: Path) -> bool:
    try:
        return json.loads((directory / "manifest.json").read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _write_world(out: Path, *, train_rows: int, eval_queries: int, seed: int, num_candidates: int, fmt: str,
                 image_size: int, tasks: list[str], row_group_size: int, video_clips: int = 0, pages: int = 0,
                 frame_size: int = 56, video_mp4: bool = False) -> None:
    train = generate_train_rows(train_rows, seed, tasks) if train_rows > 0 else ShapesSplit()
    evaluation = ShapesSplit()
    if eval_queries > 0:
        for task in tasks:
            evaluation.merge(generate_eval_rows(task, eval_queries, num_candidates, seed))
    for split_name, split in ((TRAIN_SPLIT, train), (EVAL_SPLIT, evaluation)):
        for subset, rows in split.rows.items():
            if rows:
                _write_rows(out / subset / f"{split_name}.{fmt}", rows, fmt, row_group_size)
    images = {**train.images, **evaluation.images}
    _render_images(out, images, image_size)
    extra = {}
    if video_clips:
        from rematch.world.video_clips import write_video_tasks

        extra["video"] = {"clips_per_split": video_clips, "frame_size": frame_size, "mp4": video_mp4,
                          "tasks": write_video_tasks(out, video_clips, seed, frame_size, video_mp4)}
    if pages:
        from rematch.world.pages import write_page_tasks

        extra["visdoc"] = {"pages_per_split": pages, "tasks": write_page_tasks(out, pages, seed)}
    manifest = {
        "generator": GENERATOR, "version": 1, "seed": seed, "train_rows": train_rows,
        "eval_queries": eval_queries, "num_candidates": num_candidates, "format": fmt, "image_size": image_size,
        "subsets": {task: {"meta_task": TASKS[task], "split": "IND", "train": len(train.rows.get(task, [])),
                           "test": len(evaluation.rows.get(task, []))} for task in tasks},
        "images": len(images), **extra,
    }  # no timing in it: the same command writes the same manifest (a rerun after kill -9 included)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _write_rows(path: Path, rows: list[dict], fmt: str, row_group_size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "jsonl":
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp, row_group_size=row_group_size)
    os.replace(tmp, path)


def _render_images(root: Path, images: dict[str, ImageSpec], side: int) -> None:
    """Render every image once; crops of one scene share a single render of it."""
    by_scene: dict[Scene, list[tuple[str, ImageSpec]]] = {}
    for path, spec in images.items():
        by_scene.setdefault(spec.scene, []).append((path, spec))
    made_dirs = set()
    for scene, specs in by_scene.items():
        full = render(scene, side)
        for path, spec in specs:
            target = root / path
            if target.parent not in made_dirs:
                target.parent.mkdir(parents=True, exist_ok=True)
                made_dirs.add(target.parent)
            spec.render(side, full).save(target, compress_level=1)


__all__ = ["ANSWERS", "CLS_QUERY", "CROP_TARGET", "GROUND_QUERY", "I2T_QUERY", "IMAGE_TARGET", "ImageSpec", "LABELS",
           "ShapesSplit", "T2I_QUERY", "TASKS", "TASK_BUILDERS", "VQA_QUERY", "answer_question",
           "generate_eval_rows", "generate_train_rows", "make_question", "write_shapes_dataset"]
