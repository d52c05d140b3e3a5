"""Page images of the shapes world: rendered text pages about scenes, and questions one page answers.

A page is a title ("Scene 4127") and a few sentences about one scene of the shapes world: how
many objects it has, where each object is ("A large red circle is in the top left."), and how
each pair stands ("The red circle is left of the blue square."). It is drawn with PIL's default
font; :func:`drawn_lines` gives the exact lines drawn (the corpus table stores them as
``text``), so tests check the text a page shows without OCR. Each page gets one question
whose answer only that page holds:

* relation: "Where is the red circle relative to the blue square?" (no other page has both);
* position: "Which scene has a large red circle in the top left?" (answer: the page's title);
* count: "How many objects are in Scene 4127?".

Relevance is binary, as in ViDoRe v1's qrels: score 1 for the one page that answers.

Which scenes, structurally: train pages show scenes of the train half of all layouts and test
pages scenes of the test half (:func:`rematch.world.scenes.layout_split`, as the image
world), so no page scene is in both. Everything is a pure function of ``(split, seed, count)``.

LAYOUT (what M's MMEB-V2 visdoc readers read; VLM2Vec's ``vidore`` parser, BEIR configs)::

    ROOT/visdoc-tasks/ShapesPages/task.json   {"family": "vidore", "category": "VDRv1", "tables",
                                               "pages": "visdoc-tasks/ShapesPages/images/test", "split": "test"}
    ROOT/visdoc-tasks/ShapesPages/queries/<split>.parquet   query-id (int), query, answer, kind
    ROOT/visdoc-tasks/ShapesPages/corpus/<split>.parquet    corpus-id (int), image ({bytes, path}: the PNG,
                                                            as the Hugging Face Image feature stores it),
                                                            title, text (the lines drawn), scene (JSON)
    ROOT/visdoc-tasks/ShapesPages/qrels/<split>.parquet     query-id, corpus-id, score (1: the page that answers)
    ROOT/visdoc-tasks/ShapesPages/images/<split>/<corpus-id>.png   the same page images as files

``task.json`` (the descriptor :mod:`rematch.evaluation.mmeb_v2.tasks` reads; paths relative
to ROOT) describes the evaluated ``test`` split, whose page directory (VLM2Vec's
``image_root``, read as ``<image_root>/<corpus-id>.png``) is ``images/test``; the train
split's pages are in ``images/train``. Corpus ids are unique within a split (0..n-1); every
query has exactly one relevant page.
"""

from __future__ import annotations

import functools
import io
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from rematch.world.scenes import Scene, random_scene, scene_to_dict
from rematch.world.v2_layout import VISDOC_DIR, write_table, write_task_descriptor

SPLITS = ("train", "test")
TASK = "ShapesPages"
CATEGORY = "VDRv1"  # the report's column for ViDoRe-v1-like single-page retrieval
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
QUERY_KINDS = ("relation", "position", "count")
RELEVANT = 1
PAGE_SIZE = (280, 364)  # portrait; multiples of 28 so a Qwen-VL patch grid fits exactly
PAGE_SIZE_RANGE = (112, 2048)
MAX_PAGES = 8000  # titles are distinct four-digit numbers
MARGIN = 14
TITLE_FONT_SIZE, BODY_FONT_SIZE = 16, 11
LINE_SPACING = 4


def position_words(x: float, y: float) -> str:
    """Where a centre lies, in thirds: "top left", "middle right", "centre", "bottom centre"."""
    column = "left" if x < 1 / 3 else "right" if x > 2 / 3 else "centre"
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else "middle"
    if row == "middle":
        return "centre" if column == "centre" else f"middle {column}"
    return f"{row} {column}"


# ====================================================================== pages and their facts


@dataclass(frozen=True)
class Page:
    """A page about one scene: its title and its sentences (before wrapping to the page width)."""

    corpus_id: int
    title: str
    scene: Scene
    sentences: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join((self.title, *self.sentences))


def count_sentence(scene: Scene) -> str:
    n = len(scene.objects)
    return f"There {'is' if n == 1 else 'are'} {COUNT_WORDS[n]} object{'s' if n > 1 else ''} in this scene."


def position_sentence(scene: Scene, index: int) -> str:
    o = scene.objects[index]
    return f"A {o.size} {o.colour} {o.shape} is in the {position_words(o.x, o.y)}."


def relation_sentence(scene: Scene, first: int, second: int) -> str:
    a, b = scene.objects[first], scene.objects[second]
    return f"The {a.colour} {a.shape} is {scene.relation(first, second)} the {b.colour} {b.shape}."


def make_page(corpus_id: int, title: str, scene: Scene) -> Page:
    objects = range(len(scene.objects))
    sentences = [count_sentence(scene)] + [position_sentence(scene, i) for i in objects]
    sentences += [relation_sentence(scene, i, j) for i in objects for j in objects if i < j]
    return Page(corpus_id, title, scene, tuple(sentences))


@dataclass(frozen=True)
class PageQuery:
    """A question, its short answer, the page sentence that holds it, and the objects it names."""

    query_id: int
    kind: str
    query: str
    answer: str
    sentence: str
    page: int  # corpus id of the page that answers
    objects: tuple[tuple[str, str], ...]  # (colour, shape) of each object the question names


def _identity(obj) -> tuple[str, str]:
    return (obj.colour, obj.shape)


def _candidate_queries(page: Page, rng: random.Random) -> list[PageQuery]:
    """Every question this page could answer, in a random order (uniqueness is checked by the caller)."""
    scene = page.scene
    made = []
    for i, a in enumerate(scene.objects):
        for j, b in enumerate(scene.objects):
            if i < j:  # the order the page states the pair in, so the answer is on the page
                made.append(PageQuery(-1, "relation",
                                      f"Where is the {a.colour} {a.shape} relative to the {b.colour} {b.shape}?",
                                      scene.relation(i, j), relation_sentence(scene, i, j), page.corpus_id,
                                      (_identity(a), _identity(b))))
        made.append(PageQuery(-1, "position",
                              f"Which scene has a {a.size} {a.colour} {a.shape} in the {position_words(a.x, a.y)}?",
                              page.title, position_sentence(scene, i), page.corpus_id, (_identity(a),)))
    rng.shuffle(made)
    n = len(scene.objects)
    made.append(PageQuery(-1, "count", f"How many objects are in {page.title}?", COUNT_WORDS[n],
                          count_sentence(scene), page.corpus_id, ()))
    return made


def _unique(query: PageQuery, page: Page, pages: Sequence[Page]) -> bool:
    """Does only ``page`` answer ``query``? (Relation: no other page has both objects; position:
    no other page states the same sentence; count: titles are unique.)"""
    others = [p for p in pages if p.corpus_id != page.corpus_id]
    if query.kind == "relation":
        return not any(set(query.objects) <= set(map(_identity, p.scene.objects)) for p in others)
    if query.kind == "position":
        return not any(query.sentence in p.sentences for p in others)
    return True


def page_relevance(query: PageQuery, page: Page) -> int:
    """1 for the page that answers ``query``, else 0 (ViDoRe v1's binary qrels)."""
    return RELEVANT if page.corpus_id == query.page else 0


@dataclass
class PageSet:
    """One split: the pages (the corpus), one query per page, and their qrels."""

    split: str
    pages: list[Page]
    queries: list[PageQuery]

    def qrels(self) -> list[dict]:
        return [{"query-id": q.query_id, "corpus-id": p.corpus_id, "score": score}
                for q in self.queries for p in self.pages if (score := page_relevance(q, p)) > 0]


def generate_pages(split: str, n: int, seed: int = 0) -> PageSet:
    """``n`` pages of ``split`` and one question per page that only it answers (shuffled)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    check_page_sizes(n, PAGE_SIZE)
    rng = random.Random(f"rematch-world-pages/{split}/{seed}")
    numbers = rng.sample(range(1000, 10_000), n)  # distinct four-digit titles
    pages = [make_page(index, f"Scene {number}", random_scene(rng, rng.choice((2, 3)), split))
             for index, number in enumerate(numbers)]
    queries = []
    for page in pages:
        query = next(q for q in _candidate_queries(page, rng) if _unique(q, page, pages))
        queries.append(query)
    rng.shuffle(queries)
    queries = [replace(q, query_id=index) for index, q in enumerate(queries)]
    return PageSet(split, pages, queries)


# ====================================================================== rendering


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``size`` (loaded once: loading it costs more than drawing a page)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels."""
    if font.getlength(text) <= width:  # most sentences fit: one measurement, not one per word
        return [text]
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and font.getlength(trial) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return lines + ([current] if current else [])


def layout_page(page: Page, size: tuple[int, int] = PAGE_SIZE) -> list[tuple[str, int, int, int]]:
    """Where each drawn line goes: (text, font size, x, y). The title first, then the sentences wrapped."""
    width, height = size
    placed, y = [], MARGIN
    for text, font_size in [(page.title, TITLE_FONT_SIZE)] + [(s, BODY_FONT_SIZE) for s in page.sentences]:
        font = _font(font_size)
        for line in wrap(text, font, width - 2 * MARGIN):
            placed.append((line, font_size, MARGIN, y))
            y += font_size + LINE_SPACING
        y += LINE_SPACING * (3 if font_size == TITLE_FONT_SIZE else 1)
    if y > height:
        raise ValueError(f"page {page.corpus_id} needs {y} px of height, the page has {height}: use a taller page")
    return placed


def render_page(page: Page, size: tuple[int, int] = PAGE_SIZE) -> Image.Image:
    """Draw the page: black text on white, the title larger."""
    return draw_layout(layout_page(page, size), size)


def draw_layout(placed: Sequence[tuple[str, int, int, int]], size: tuple[int, int] = PAGE_SIZE) -> Image.Image:
    """Draw lines placed by :func:`layout_page`."""
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for text, font_size, x, y in placed:
        draw.text((x, y), text, fill=(0, 0, 0), font=_font(font_size))
    return image


def drawn_lines(page: Page, size: tuple[int, int] = PAGE_SIZE) -> list[str]:
    """The lines :func:`render_page` draws, in order."""
    return [text for text, *_ in layout_page(page, size)]


# ====================================================================== writing


def check_page_sizes(pages: int, size: tuple[int, int]) -> None:
    if isinstance(pages, bool) or not isinstance(pages, int) or not 0 <= pages <= MAX_PAGES:
        raise ValueError(f"pages (--pages) must be an integer within 0..{MAX_PAGES}, got {pages!r}")
    low, high = PAGE_SIZE_RANGE
    if len(size) != 2 or not all(isinstance(v, int) and low <= v <= high for v in size):
        raise ValueError(f"page size must be two integers within {low}..{high} pixels, got {size!r}")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_page_tasks(root: str | Path, pages: int, seed: int = 0, size: tuple[int, int] = PAGE_SIZE) -> dict:
    """Write ``pages`` pages (and as many queries) per split under ``root`` in the layout above;
    return what was written (for the world's manifest)."""
    check_page_sizes(pages, size)
    root = Path(root)
    task_dir = root / VISDOC_DIR / TASK
    counts: dict = {}
    for split in SPLITS:
        made = generate_pages(split, pages, seed)
        counts[split] = {"pages": len(made.pages), "queries": len(made.queries)}
        if not made.pages:
            continue
        corpus = []
        for page in made.pages:
            placed = layout_page(page, size)
            data = _png(draw_layout(placed, size))
            target = task_dir / "images" / split / f"{page.corpus_id}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            corpus.append({"corpus-id": page.corpus_id, "image": {"bytes": data, "path": f"{page.corpus_id}.png"},
                           "title": page.title, "text": "\n".join(text for text, *_ in placed),
                           "scene": json.dumps(scene_to_dict(page.scene), sort_keys=True)})
        write_table(task_dir / "corpus" / f"{split}.parquet", corpus)
        write_table(task_dir / "queries" / f"{split}.parquet",
                    [{"query-id": q.query_id, "query": q.query, "answer": q.answer, "kind": q.kind}
                     for q in made.queries])
        write_table(task_dir / "qrels" / f"{split}.parquet", made.qrels())
    if pages:
        write_task_descriptor(task_dir, {"family": "vidore", "category": CATEGORY, "tables": [f"{VISDOC_DIR}/{TASK}"],
                                         "pages": f"{VISDOC_DIR}/{TASK}/images/test", "split": "test"})
    return {TASK: {"parser": "vidore", "category": CATEGORY, **counts}}


__all__ = ["PAGE_SIZE", "Page", "PageQuery", "PageSet", "QUERY_KINDS", "RELEVANT", "TASK", "drawn_lines",
           "generate_pages", "layout_page", "make_page", "page_relevance", "position_words", "render_page",
           "write_page_tasks"]
