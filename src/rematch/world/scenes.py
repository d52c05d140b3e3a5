"""The built-in "shapes" world: scenes of coloured shapes and their plain-English captions.

It is the project's embedded data: the demo, the tests and users without downloads all
run on it. This module holds the world itself (vocabulary, scene graphs, rendering,
captions); the MMEB-style tasks built from it live in ``rematch.world.tasks``.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 1 / 8, "large": 1 / 4}
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape: what it is and where its centre lies (fractions of the image side)."""

    colour: str
    shape: str
    size: str
    x: float
    y: float

    @property
    def noun_phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A white square canvas with 1-3 non-overlapping objects."""

    objects: tuple[ShapeObject, ...]

    def relation(self, first: int = 0, second: int = 1) -> str:
        """The dominant spatial relation of object ``first`` to object ``second`` (from centres)."""
        a, b = self.objects[first], self.objects[second]
        dx, dy = a.x - b.x, a.y - b.y
        if abs(dx) >= abs(dy):
            return "left of" if dx < 0 else "right of"
        return "above" if dy < 0 else "below"


def render(scene: Scene, side: int = 112, object_scale: float = 1.0) -> Image.Image:
    """Draw a scene as an RGB image of ``side`` x ``side`` pixels.

    ``object_scale`` draws every object that many times its size's radius (clipped at the
    border): only the pre-training curriculum uses it, to start from objects that fill most
    of the image (:mod:`rematch.training.curriculum`).
    """
    image = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, side, object_scale)
    return image


def object_mask(obj: ShapeObject, side: int = 112, object_scale: float = 1.0) -> Image.Image:
    """The pixels ``render`` paints for ``obj`` alone, as a mode "L" image (255 inside, 0 outside):
    where an object lies in the image, for targets that must follow the drawing exactly
    (the vision-tower warm-up of :mod:`rematch.training.tower_warmup`)."""
    image = Image.new("RGB", (side, side), (0, 0, 0))
    _draw_object(ImageDraw.Draw(image), obj, side, object_scale)
    return image.convert("L").point(lambda value: 255 if value else 0)


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, side: int, scale: float = 1.0) -> None:
    radius = SIZES[obj.size] * side / 2 * scale
    cx, cy = obj.x * side, obj.y * side
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif obj.shape == "square":
        half = radius * 0.9
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif obj.shape == "triangle":  # pointing up
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)],
                     fill=fill)
    elif obj.shape == "star":  # five points
        points = []
        for index in range(10):
            angle = -math.pi / 2 + index * math.pi / 5
            r = radius if index % 2 == 0 else radius * 0.45
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def caption(scene: Scene) -> str:
    """Plain-English caption: "a large red circle", "a small blue star left of a large green square"."""
    objects = scene.objects
    if len(objects) == 1:
        return objects[0].noun_phrase
    return f"{objects[0].noun_phrase} {scene.relation(0, 1)} {objects[1].noun_phrase}"


# ====================================================================== scene graphs as data
#
# Everything below treats a scene as a *graph* (objects with attributes, relations from
# centres), so tasks, hard negatives and tests reason about what an image shows without
# looking at pixels.

#: Object centres lie on a 1/GRID lattice: scenes are discrete, so "the same scene" is exact.
GRID = 32
#: Minimum gap between two objects' bounding circles (fraction of the side).
GAP = 1 / 32
#: A relation is only used when one axis dominates the other by this factor (no near-diagonals).
CLEAR_RELATION = 1.5
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SPLITS = ("train", "test")
PERTURBATIONS = ("swap_colours", "reverse_relation", "replace_colour", "replace_shape", "replace_size")
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES)}


def object_radius(size: str) -> float:
    """Radius of an object's bounding circle, as a fraction of the image side."""
    return SIZES[size] / 2


def layout_split(scene: Scene) -> str:
    """The split a scene belongs to, from the *set of its object positions* alone.

    Colour, shape and size changes and position swaps keep the set, so a scene and all its
    hard negatives fall in the same split: train and test never share a scene (nor a layout).
    """
    positions = sorted((round(o.x * GRID), round(o.y * GRID)) for o in scene.objects)
    digest = hashlib.blake2b(repr(positions).encode(), digest_size=2).digest()
    return SPLITS[digest[0] & 1]


def scene_is_valid(scene: Scene) -> bool:
    """1-3 known objects, inside the canvas, not overlapping, each a distinct colour+shape,
    and every pair in a clear spatial relation."""
    objects = scene.objects
    if not 1 <= len(objects) <= 3:
        return False
    for obj in objects:
        if obj.colour not in COLOURS or obj.shape not in SHAPES or obj.size not in SIZES:
            return False
        r = object_radius(obj.size)
        if not (r <= obj.x <= 1 - r and r <= obj.y <= 1 - r):
            return False
    if len({(o.colour, o.shape) for o in objects}) != len(objects):
        return False
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            dx, dy = abs(a.x - b.x), abs(a.y - b.y)
            if math.hypot(dx, dy) < object_radius(a.size) + object_radius(b.size) + GAP - 1e-9:
                return False
            if max(dx, dy) < CLEAR_RELATION * min(dx, dy):
                return False
    return True


def random_scene(rng: random.Random, n_objects: int, split: str | None = None, max_tries: int = 10_000) -> Scene:
    """A random valid scene with ``n_objects`` objects, from ``split``'s half of all layouts."""
    for _ in range(max_tries):
        objects = []
        for _ in range(n_objects):
            size = rng.choice(tuple(SIZES))
            low = math.ceil(object_radius(size) * GRID)
            x, y = rng.randint(low, GRID - low) / GRID, rng.randint(low, GRID - low) / GRID
            objects.append(ShapeObject(rng.choice(tuple(COLOURS)), rng.choice(SHAPES), size, x, y))
        scene = Scene(tuple(objects))
        if scene_is_valid(scene) and (split is None or layout_split(scene) == split):
            return scene
    raise RuntimeError(f"could not place {n_objects} objects in {max_tries} tries")


def scene_to_dict(scene: Scene) -> dict:
    return {"objects": [{"colour": o.colour, "shape": o.shape, "size": o.size, "x": o.x, "y": o.y}
                        for o in scene.objects]}


def scene_from_dict(data: dict) -> Scene:
    return Scene(tuple(ShapeObject(o["colour"], o["shape"], o["size"], float(o["x"]), float(o["y"]))
                       for o in data["objects"]))


# ---------------------------------------------------------------------- descriptions (what text says)


@dataclass(frozen=True)
class ObjectSpec:
    """An object as a text names it; ``None`` attributes are left unsaid ("a red circle")."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None

    def matches(self, obj: ShapeObject) -> bool:
        return all(want is None or want == have for want, have in
                   ((self.colour, obj.colour), (self.shape, obj.shape), (self.size, obj.size)))

    @property
    def noun_phrase(self) -> str:
        words = [w for w in (self.size, self.colour, self.shape or "object") if w]
        return "a " + " ".join(words)


@dataclass(frozen=True)
class Description:
    """What a caption or label asserts: one or two objects and, for two, their relation."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    @property
    def text(self) -> str:
        if len(self.objects) == 1:
            return self.objects[0].noun_phrase
        return f"{self.objects[0].noun_phrase} {self.relation} {self.objects[1].noun_phrase}"

    @property
    def label(self) -> str:
        """The bare "colour shape" label (classification targets)."""
        return " ".join(w for w in (self.objects[0].colour, self.objects[0].shape) if w)

    def to_dict(self) -> dict:
        return {"objects": [{k: v for k, v in (("colour", o.colour), ("shape", o.shape), ("size", o.size))
                             if v is not None} for o in self.objects], "relation": self.relation}

    @classmethod
    def from_dict(cls, data: dict) -> "Description":
        return cls(tuple(ObjectSpec(**o) for o in data["objects"]), data.get("relation"))


def describe(scene: Scene) -> Description:
    """The description :func:`caption` writes: the first object, or the first two and their relation."""
    specs = tuple(ObjectSpec(o.colour, o.shape, o.size) for o in scene.objects[:2])
    return Description(specs, scene.relation(0, 1) if len(specs) == 2 else None)


def describes(description: Description, scene: Scene) -> bool:
    """Does ``scene`` satisfy ``description`` (some objects match, in the stated relation)?"""
    objects = scene.objects
    first = [i for i, o in enumerate(objects) if description.objects[0].matches(o)]
    if len(description.objects) == 1:
        return bool(first)
    second = description.objects[1]
    return any(i != j and second.matches(objects[j]) and scene.relation(i, j) == description.relation
               for i in first for j in range(len(objects)))


# ---------------------------------------------------------------------- compositional perturbations


def _replace(obj: ShapeObject, **changes) -> ShapeObject:
    return ShapeObject(**{**obj.__dict__, **changes})


def perturb_scene(scene: Scene, kind: str, rng: random.Random) -> Scene | None:
    """A scene that differs from ``scene`` in exactly the way ``kind`` says, or None if
    ``kind`` does not apply or the result is not a valid scene:

    * ``swap_colours``: objects 0 and 1 exchange colours;
    * ``reverse_relation``: objects 0 and 1 exchange positions (their relation flips);
    * ``replace_colour`` / ``replace_shape`` / ``replace_size``: one object's attribute changes.
    """
    objects = list(scene.objects)
    if kind == "swap_colours":
        if len(objects) < 2 or objects[0].colour == objects[1].colour:
            return None
        objects[0], objects[1] = (_replace(objects[0], colour=objects[1].colour),
                                  _replace(objects[1], colour=objects[0].colour))
    elif kind == "reverse_relation":
        if len(objects) < 2:
            return None
        a, b = objects[0], objects[1]
        objects[0], objects[1] = _replace(a, x=b.x, y=b.y), _replace(b, x=a.x, y=a.y)
    elif kind.startswith("replace_") and kind[len("replace_"):] in ATTRIBUTES:
        attribute = kind[len("replace_"):]
        index = rng.randrange(min(len(objects), 2))  # an object the caption mentions
        current = getattr(objects[index], attribute)
        objects[index] = _replace(objects[index], **{attribute: rng.choice(
            [v for v in ATTRIBUTES[attribute] if v != current])})
    else:
        raise ValueError(f"unknown perturbation {kind!r}; expected one of {PERTURBATIONS}")
    result = Scene(tuple(objects))
    return result if scene_is_valid(result) else None


def perturb_description(description: Description, kind: str, rng: random.Random) -> Description | None:
    """The text-side twin of :func:`perturb_scene`: the same changes applied to what a caption says."""
    specs = list(description.objects)
    relation = description.relation
    if kind == "swap_colours":
        if len(specs) < 2 or specs[0].colour == specs[1].colour:
            return None
        specs[0], specs[1] = (ObjectSpec(specs[1].colour, specs[0].shape, specs[0].size),
                              ObjectSpec(specs[0].colour, specs[1].shape, specs[1].size))
    elif kind == "reverse_relation":
        if relation is None:
            return None
        relation = OPPOSITE[relation]
    elif kind.startswith("replace_") and kind[len("replace_"):] in ATTRIBUTES:
        attribute = kind[len("replace_"):]
        candidates = [i for i, spec in enumerate(specs) if getattr(spec, attribute) is not None]
        if not candidates:
            return None
        index = rng.choice(candidates)
        current = getattr(specs[index], attribute)
        fields = {"colour": specs[index].colour, "shape": specs[index].shape, "size": specs[index].size}
        fields[attribute] = rng.choice([v for v in ATTRIBUTES[attribute] if v != current])
        specs[index] = ObjectSpec(**fields)
    else:
        raise ValueError(f"unknown perturbation {kind!r}; expected one of {PERTURBATIONS}")
    return Description(tuple(specs), relation)


# ---------------------------------------------------------------------- crops (grounding)


def object_box(scene: Scene, index: int, pad: float = 1.3) -> tuple[float, float, float, float]:
    """A square box (x0, y0, x1, y1 as fractions) around object ``index``, on the 1/GRID lattice."""
    obj = scene.objects[index]
    half = object_radius(obj.size) * pad
    return _snap_box((obj.x - half, obj.y - half, obj.x + half, obj.y + half))


def _snap_box(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (min(1.0, max(0.0, v)) for v in box)
    return (math.floor(x0 * GRID) / GRID, math.floor(y0 * GRID) / GRID,
            math.ceil(x1 * GRID) / GRID, math.ceil(y1 * GRID) / GRID)


def random_box(rng: random.Random, min_side: float = 0.2, max_side: float = 0.5) -> tuple[float, float, float, float]:
    width, height = rng.uniform(min_side, max_side), rng.uniform(min_side, max_side)
    x0, y0 = rng.uniform(0, 1 - width), rng.uniform(0, 1 - height)
    return _snap_box((x0, y0, x0 + width, y0 + height))


def box_contains(box: tuple[float, float, float, float], x: float, y: float) -> bool:
    x0, y0, x1, y1 = box
    return x0 <= x <= x1 and y0 <= y <= y1


def render_crop(scene: Scene, box: tuple[float, float, float, float], side: int = 112) -> Image.Image:
    """The part of the rendered scene inside ``box``."""
    x0, y0, x1, y1 = box
    return render(scene, side).crop((round(x0 * side), round(y0 * side), round(x1 * side), round(y1 * side)))
