"""The built-in "shapes" world: scenes of coloured shapes and their plain-English captions.

It is the project's embedded data: the demo, the tests and users without downloads all
run on it. This module holds the world itself (vocabulary, scene graphs, rendering,
captions); the MMEB-style tasks built from it live in ``rematch.data.shapes_tasks``.
"""

from __future__ import annotations

import math
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


def render(scene: Scene, side: int = 112) -> Image.Image:
    """Draw a scene as an RGB image of ``side`` x ``side`` pixels."""
    image = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, side)
    return image


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, side: int) -> None:
    radius = SIZES[obj.size] * side / 2
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
