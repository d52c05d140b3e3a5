"""The generative pre-training corpus of the shapes world: image + prompt -> short answer.

A tiny Qwen2-VL learns to *talk about* shapes scenes here before it learns to embed them
(issue 12): captions, short answers to questions (colour, shape, size, count, position,
relation) and Yes/No verification of a caption against the image, where half of the
captions are compositional foils (colours swapped, relation reversed, one attribute
replaced). The ReMatch matching loss asks exactly this Yes/No question, so a model that
passes verification starts fine-tuning with a working matching head.

Which scenes, structurally:

* ``pretrain`` examples draw their scenes from the *train* half of all layouts
  (:func:`rematch.world.scenes.layout_split`); every scene of the demo's evaluation
  subsets (and each of their hard negatives and crops) comes from the *test* half, so no
  pre-training scene can be one of them, whatever the seeds;
* ``heldout`` examples (what ``rematch eval generative`` measures) draw from the test
  half, so none of them was seen in pre-training;
* each split's examples come from their own seed stream: the split name, the seed and the
  generator version are hashed into every example's RNG, and example ``i`` depends on
  nothing else (random access; a resumed run continues at an index, not by replay).

Everything is a pure function of ``(GENERATOR_VERSION, split, seed, index, difficulty)``.
Change what an index produces and you must bump :data:`GENERATOR_VERSION`: the shipped
weights record the version they were trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Sequence

from PIL import Image

from rematch.world.tasks import COUNT_WORDS, EVAL_SPLIT, PLURALS, TRAIN_SPLIT
from rematch.world.scenes import (
    COLOURS,
    PERTURBATIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Description,
    ObjectSpec,
    Scene,
    describes,
    layout_split,
    perturb_description,
    perturb_scene,
    random_scene,
    render,
    scene_is_valid,
)

#: Bump whenever an index of any split would produce a different example.
GENERATOR_VERSION = 1

#: Corpus split -> the half of all layouts its scenes come from.
LAYOUT_HALF = {"pretrain": TRAIN_SPLIT, "heldout": EVAL_SPLIT}

QUESTION_TYPES = ("colour", "shape", "size", "count", "position", "relation")
TASKS = ("caption", *QUESTION_TYPES, "verify")
#: The task of a :func:`scene_example` (no question: the tower warm-up reads the scene graph).
ATTRIBUTES_TASK = "attributes"
FOIL_KINDS = PERTURBATIONS  # swap_colours, reverse_relation, replace_colour, replace_shape, replace_size

CAPTION_PROMPT = "Describe the image."
VERIFY_PROMPT = "Does this caption describe the image? {caption} Answer only Yes or No."
POSITION_AXES = {"horizontal": ("left", "right"), "vertical": ("top", "bottom")}
#: A position answer is asked only when the object's centre is this far from the middle line.
POSITION_MARGIN = 0.125
#: Where the image goes relative to the prompt: ``first`` (the chat format's default, as the
#: embedding formats have it), ``last`` (after the question: in a causal language model the
#: image tokens can then attend to the question, measured to unlock "What colour is the
#: star?" for the tiny model, docs/pretraining.md) or ``mixed`` (each example draws one, half
#: and half, from an RNG of its own so the scene and question do not change with the setting).
IMAGE_POSITIONS = ("first", "last", "mixed")
#: The orders a question can be asked in (``mixed`` is a training setting, not an order).
ASKED_POSITIONS = ("first", "last")
#: The marker an item's text uses for its image (:data:`rematch.data.items.IMAGE_PLACEHOLDER`).
IMAGE_MARK = "<image>"


class CorpusError(ValueError):
    """A corpus setting names an unknown split or task, or weights that cannot be used."""


@dataclass(frozen=True)
class Example:
    """One pre-training / evaluation example: the model sees ``image`` and ``prompt`` and
    should answer ``answer``. ``task`` is the question type (or caption / verify), ``kind``
    refines it for reports (``true`` or the foil's perturbation for verify)."""

    scene: Scene
    prompt: str
    answer: str
    task: str
    kind: str = ""
    object_scale: float = 1.0
    """Objects drawn this many times their size (the curriculum's first phases; 1 elsewhere)."""
    image_last: bool = False
    """The image comes after the prompt (see :data:`IMAGE_POSITIONS`)."""

    def image(self, side: int) -> Image.Image:
        return render(self.scene, side, self.object_scale)

    @property
    def text(self) -> str:
        """The user turn's text as the model reads it: the prompt, with the image's mark after
        it when the image comes last (before it otherwise, where the chat format puts it)."""
        return f"{self.prompt}\n{IMAGE_MARK}" if self.image_last else self.prompt


@dataclass(frozen=True)
class CorpusSpec:
    """What a corpus stream is: its split, seed, task mix and scene difficulty."""

    split: str = "pretrain"
    seed: int = 0
    task_weights: dict[str, float] = field(default_factory=lambda: {task: 1.0 for task in TASKS})
    object_weights: Sequence[float] = (1.0, 2.0, 2.0)
    """Relative frequency of scenes with 1, 2 and 3 objects."""
    image_position: str = "first"
    """``first``, ``last`` or ``mixed``: where the image goes relative to the prompt (:data:`IMAGE_POSITIONS`)."""

    def validate(self) -> None:
        if self.split not in LAYOUT_HALF:
            raise CorpusError(f"unknown corpus split {self.split!r}; choose one of {sorted(LAYOUT_HALF)}")
        if self.image_position not in IMAGE_POSITIONS:
            raise CorpusError(f"unknown image position {self.image_position!r}; choose one of "
                              f"{', '.join(IMAGE_POSITIONS)}")
        unknown = set(self.task_weights) - set(TASKS)
        if unknown:
            raise CorpusError(f"unknown corpus tasks {sorted(unknown)}; known: {', '.join(TASKS)}")
        if any(not (weight >= 0) for weight in self.task_weights.values()) or not sum(self.task_weights.values()):
            raise CorpusError(f"task weights must be >= 0 with a positive sum, got {dict(self.task_weights)}")
        if len(self.object_weights) != 3 or any(not (w >= 0) for w in self.object_weights) or \
                not sum(self.object_weights):
            raise CorpusError(f"object_weights must be 3 weights (1, 2, 3 objects) >= 0 with a positive sum, got "
                              f"{list(self.object_weights)}")


def example_rng(split: str, seed: int, index: int) -> random.Random:
    """The RNG of one example: split name, seed, index and generator version hashed together."""
    return random.Random(f"rematch-world/pretrain-corpus/v{GENERATOR_VERSION}/{split}/{seed}/{index}")


def asked_position(image_position: str) -> str:
    """The order to ask held-out questions in, for a model trained with ``image_position``:
    ``last`` only if every training example had its image last (``mixed`` and ``first``
    models are asked image-first, the order the embedding formats use)."""
    return "last" if image_position == "last" else "first"


def image_comes_last(spec: CorpusSpec, index: int) -> bool:
    """Whether example ``index`` puts its image after the prompt. ``mixed`` draws from an RNG of
    its own: the example's scene, question and answer are the same under every setting."""
    if spec.image_position == "mixed":
        return random.Random(f"rematch-world/pretrain-corpus/image-position/{spec.split}/{spec.seed}/{index}"
                             ).random() < 0.5
    return spec.image_position == "last"


def make_example(spec: CorpusSpec, index: int, large_only: bool = False, single_object: bool = False,
                 object_scale: float = 1.0) -> Example:
    """Example ``index`` of the stream ``spec`` describes.

    The curriculum's early phases: ``single_object`` shows one object per scene (two for
    relation questions, which need a pair), so every other question is answered by what the
    whole image shows and the vision tower learns colours
    and shapes before the model must bind them to words (with several objects a random
    backbone sits on the text prior for a long time); ``large_only`` keeps every object
    large, which at small image sizes is the difference between learning and staying at
    chance (issue 12); ``object_scale`` draws the objects larger than any size of the world
    (a large object covers about 5% of the image, one merged visual token: a random backbone
    does not find it, while a colour that fills most of the image is learned in a few
    hundred steps, and shrinking the objects from there keeps what was learned). The scene,
    prompt and answer do not depend on it, only the drawing.
    """
    rng = example_rng(spec.split, spec.seed, index)
    tasks = [task for task in TASKS if spec.task_weights.get(task, 0) > 0]
    task = rng.choices(tasks, weights=[spec.task_weights[task] for task in tasks])[0]
    half = LAYOUT_HALF[spec.split]
    writer = WRITERS[task]
    if task == "verify":  # drawn once, so foils that fail on one scene do not tilt the Yes/No balance
        writer = partial(_verify, true_caption=rng.random() < 0.5)
    for _ in range(1000):
        scene = _scene(rng, spec, half, large_only, (2 if task == "relation" else 1) if single_object else None)
        made = writer(scene, rng)
        if made is not None:
            prompt, answer, kind = made
            return Example(scene, prompt, answer, task, kind, object_scale, image_comes_last(spec, index))
    raise RuntimeError(f"no {task} example found in 1000 scenes (split {spec.split}, index {index})")


def scene_example(spec: CorpusSpec, index: int, large_only: bool = False, single_object: bool = False,
                  object_scale: float = 1.0) -> Example:
    """Scene ``index`` of the stream ``spec`` describes, with no question: what the vision-tower
    warm-up (:mod:`rematch.training.tower_warmup`) learns from, which reads every object's
    attributes off the scene itself. Task ``attributes``; prompt and answer are empty."""
    rng = example_rng(spec.split, spec.seed, index)
    scene = _scene(rng, spec, LAYOUT_HALF[spec.split], large_only, 1 if single_object else None)
    return Example(scene, "", "", ATTRIBUTES_TASK, "", object_scale)


#: The task name of a verification pair (the pre-training objective ``matching``).
MATCHING_TASK = "matching"
#: Foil kinds that change one object's attribute (what a single-object scene can have).
SINGLE_ATTRIBUTE_FOILS = ("replace_colour", "replace_shape", "replace_size")


@dataclass(frozen=True)
class VerificationPair:
    """A scene with a true caption and a compositional foil of it, asked in the matching layout.

    Why a pair and not a Yes/No question: the matching branch sees one query and two
    documents per sample, the relevant one and a hard negative. Here the two differ in exactly
    one stated way (``kind``), so the only thing that separates their answers is the comparison
    itself: neither the image nor the caption's wording alone tells "Yes" from "No", and the
    pair's shared half cancels out of the loss. ``image_query``: the image is the query and the
    two captions the documents (image -> text, as I2T and classification); otherwise the true
    caption is the query and the documents are the scene and the scene changed the same way
    (text -> image, as T2I).
    """

    scene: Scene
    caption: str
    foil: str
    foil_scene: Scene | None
    kind: str
    image_query: bool
    object_scale: float = 1.0
    task: str = MATCHING_TASK

    def image(self, side: int) -> Image.Image:
        return render(self.scene, side, self.object_scale)

    def foil_image(self, side: int) -> Image.Image:
        if self.foil_scene is None:
            raise ValueError("this pair's foil is a caption, not a scene")
        return render(self.foil_scene, side, self.object_scale)


def verification_pair(spec: CorpusSpec, index: int, large_only: bool = False, single_object: bool = False,
                      object_scale: float = 1.0, foil_kinds: Sequence[str] | None = None) -> VerificationPair:
    """Verification pair ``index`` of the stream ``spec`` describes (a pure function of both).

    ``foil_kinds`` limits the foils (default: every kind the scene allows; single objects
    allow only :data:`SINGLE_ATTRIBUTE_FOILS`). Half the pairs put the image first as the
    query, half the caption (an RNG of its own decides, so the scene and foil do not depend on it).
    """
    kinds = tuple(foil_kinds or FOIL_KINDS)
    unknown = set(kinds) - set(FOIL_KINDS)
    if unknown:
        raise CorpusError(f"unknown foil kinds {sorted(unknown)}; known: {', '.join(FOIL_KINDS)}")
    rng = example_rng(f"{spec.split}/matching", spec.seed, index)
    image_query = random.Random(f"rematch-world/pretrain-corpus/matching-orientation/{spec.split}/{spec.seed}/"
                                f"{index}").random() < 0.5
    for _ in range(1000):
        scene = _scene(rng, spec, LAYOUT_HALF[spec.split], large_only, 1 if single_object else None)
        usable = [kind for kind in kinds if len(scene.objects) > 1 or kind in SINGLE_ATTRIBUTE_FOILS]
        if not usable:
            raise CorpusError(f"foil kinds {list(kinds)} need scenes of two or more objects")
        truth = _described(scene, rng)
        kind = rng.choice(usable)
        foil = perturb_description(truth, kind, rng)
        if foil is None or describes(foil, scene):
            continue
        foil_scene = None
        if not image_query:  # the true caption asks; the documents are the scene and a scene changed by `kind`
            foil_scene = _scene_changed_like(scene, truth, kind, rng)
            if foil_scene is None:
                continue
        return VerificationPair(scene, truth.text, foil.text, foil_scene, kind, image_query, object_scale)
    raise RuntimeError(f"no verification pair found in 1000 scenes (split {spec.split}, index {index})")


def _described(scene: Scene, rng: random.Random) -> Description:
    """A true description of one object, or of objects 0 and 1 (in random order) and their relation:
    the objects :func:`~rematch.world.scenes.perturb_scene` changes, so a foil scene changes what
    the caption mentions (scenes list their objects in random order, so this is any pair)."""
    objects = scene.objects
    if len(objects) == 1:
        return Description((ObjectSpec(objects[0].colour, objects[0].shape, objects[0].size),))
    first, second = rng.sample((0, 1), 2)
    return Description((ObjectSpec(objects[first].colour, objects[first].shape, objects[first].size),
                        ObjectSpec(objects[second].colour, objects[second].shape, objects[second].size)),
                       scene.relation(first, second))


def _scene_changed_like(scene: Scene, truth: Description, kind: str, rng: random.Random) -> Scene | None:
    """A valid scene changed by ``kind`` that the true caption no longer describes (None if none is found)."""
    for _ in range(20):
        changed = perturb_scene(scene, kind, rng)
        if changed is not None and scene_is_valid(changed) and not describes(truth, changed):
            return changed
    return None


def heldout_verification_pairs(count: int, seed: int = 0, single_object: bool = False,
                               foil_kinds: Sequence[str] | None = None) -> list[VerificationPair]:
    """``count`` pairs of the ``heldout`` stream (scenes never seen in pre-training)."""
    if count < 1:
        raise ValueError(f"the number of held-out verification pairs must be >= 1, got {count}")
    spec = CorpusSpec(split="heldout", seed=seed, task_weights={"verify": 1.0})
    return [verification_pair(spec, index, single_object=single_object, foil_kinds=foil_kinds)
            for index in range(count)]


def heldout_examples(per_type: int, seed: int = 0, image_position: str = "first") -> list[Example]:
    """``per_type`` examples of every question type, ``per_type`` true captions and
    ``per_type`` foils to verify, from the ``heldout`` stream (in stream order). The scenes,
    questions and answers do not depend on ``image_position`` (``first`` or ``last``)."""
    if per_type < 1:
        raise ValueError(f"the number of held-out examples per type must be >= 1, got {per_type}")
    if image_position not in ASKED_POSITIONS:
        raise ValueError(f"held-out examples put the image first or last, not {image_position!r}")
    wanted = {**{task: per_type for task in QUESTION_TYPES}, "verify/true": per_type, "verify/foil": per_type}
    spec = CorpusSpec(split="heldout", seed=seed, task_weights={task: 1.0 for task in (*QUESTION_TYPES, "verify")},
                      image_position=image_position)
    chosen, index = [], 0
    while any(wanted.values()):
        example = make_example(spec, index)
        index += 1
        key = example.task if example.task != "verify" else f"verify/{'true' if example.kind == 'true' else 'foil'}"
        if wanted.get(key, 0) > 0:
            wanted[key] -= 1
            chosen.append(example)
    return chosen


def _scene(rng: random.Random, spec: CorpusSpec, half: str, large_only: bool, count: int | None = None) -> Scene:
    n = rng.choices((1, 2, 3), weights=list(spec.object_weights))[0]
    if count is not None:  # the curriculum's fixed object count
        n = count
    scene = random_scene(rng, n, half)
    if large_only and any(obj.size != "large" for obj in scene.objects):
        enlarged = Scene(tuple(replace(obj, size="large") for obj in scene.objects))
        if scene_is_valid(enlarged) and layout_split(enlarged) == half:
            return enlarged
        return _scene(rng, spec, half, large_only, count)
    return scene


# ---------------------------------------------------------------------- writers: scene -> (prompt, answer, kind)


def _unique(objects, **attributes) -> list:
    return [o for o in objects if all(getattr(o, key) == value for key, value in attributes.items())]


def _caption(scene: Scene, rng: random.Random):
    objects = scene.objects
    if len(objects) == 1:
        return CAPTION_PROMPT, objects[0].noun_phrase, ""
    if len(objects) == 3:  # a caption names one pair; which pair of three would be a guess
        return None
    first, second = rng.sample(range(len(objects)), 2)
    return CAPTION_PROMPT, f"{objects[first].noun_phrase} {scene.relation(first, second)} " \
                           f"{objects[second].noun_phrase}", ""


def _colour(scene: Scene, rng: random.Random):
    shape = rng.choice(SHAPES)
    hits = _unique(scene.objects, shape=shape)
    return (f"What colour is the {shape}?", hits[0].colour, "") if len(hits) == 1 else None


def _shape(scene: Scene, rng: random.Random):
    colour = rng.choice(tuple(COLOURS))
    hits = _unique(scene.objects, colour=colour)
    return (f"What shape is the {colour} object?", hits[0].shape, "") if len(hits) == 1 else None


def _size(scene: Scene, rng: random.Random):
    obj = rng.choice(scene.objects)
    return f"What size is the {obj.colour} {obj.shape}?", obj.size, ""


def _count(scene: Scene, rng: random.Random):
    if rng.random() < 0.5:
        return "How many objects are there?", COUNT_WORDS[len(scene.objects)], "objects"
    shape = rng.choice(SHAPES)
    return f"How many {PLURALS[shape]} are there?", COUNT_WORDS[len(_unique(scene.objects, shape=shape))], "shape"


def _position(scene: Scene, rng: random.Random):
    obj = rng.choice(scene.objects)
    axis = rng.choice(tuple(POSITION_AXES))
    value = obj.x if axis == "horizontal" else obj.y
    if abs(value - 0.5) < POSITION_MARGIN:
        return None
    low, high = POSITION_AXES[axis]
    question = (f"Is the {obj.colour} {obj.shape} on the left or the right?" if axis == "horizontal"
                else f"Is the {obj.colour} {obj.shape} at the top or the bottom?")
    return question, low if value < 0.5 else high, axis


def _relation(scene: Scene, rng: random.Random):
    if len(scene.objects) < 2:
        return None
    first, second = rng.sample(range(len(scene.objects)), 2)
    a, b = scene.objects[first], scene.objects[second]
    return (f"Where is the {a.colour} {a.shape} relative to the {b.colour} {b.shape}?",
            scene.relation(first, second), "")


def _verify(scene: Scene, rng: random.Random, true_caption: bool = True):
    """A true caption of ``scene`` (Yes) or a compositional foil of one (No)."""
    objects = scene.objects
    if len(objects) == 1:
        truth = Description((ObjectSpec(objects[0].colour, objects[0].shape, objects[0].size),))
    else:
        first, second = rng.sample(range(len(objects)), 2)
        truth = Description((ObjectSpec(objects[first].colour, objects[first].shape, objects[first].size),
                             ObjectSpec(objects[second].colour, objects[second].shape, objects[second].size)),
                            scene.relation(first, second))
    if true_caption:
        return VERIFY_PROMPT.format(caption=truth.text), "Yes", "true"
    kinds = [kind for kind in FOIL_KINDS if len(objects) > 1 or kind not in ("swap_colours", "reverse_relation")]
    kind = rng.choice(kinds)
    foil = perturb_description(truth, kind, rng)
    if foil is None or describes(foil, scene):  # e.g. the swapped colours name two other real objects
        return None
    return VERIFY_PROMPT.format(caption=foil.text), "No", kind


WRITERS = {"caption": _caption, "colour": _colour, "shape": _shape, "size": _size, "count": _count,
           "position": _position, "relation": _relation, "verify": _verify}

#: Every short answer a question type can have (what a normalised greedy answer is compared with).
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES), "count": COUNT_WORDS,
    "position": ("left", "right", "top", "bottom"), "relation": RELATIONS, "verify": ("Yes", "No"),
}


def normalise_answer(text: str) -> str:
    """Lower case, outer whitespace and a final full stop removed: "Red." and "red" agree."""
    return " ".join(text.strip().rstrip(".").lower().split())
