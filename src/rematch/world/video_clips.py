"""Video clips of the shapes world: 2-3 shapes, one of which moves, and what a sentence says about it.

A clip is a start scene, the object that moves, its direction (left, right, up, down), its step
(lattice cells per frame) and a frame count (4-8). Its frames are scene graphs, so captions,
labels and answers are computed from the data, and tests check them without looking at pixels:
"the red circle moves up", or, when the move changes how the mover stands to another object,
"the red circle moves left of the blue square" (it ends left of it and did not start there).

Which scenes, structurally: a clip belongs to the train or the test half by the *set of its
objects* (colour, shape, size), which every frame of it shares, so no frame of a train clip can
equal a frame of a test clip. Everything is a pure function of ``(task, split, seed, count)``.

LAYOUT (what M's MMEB-V2 readers read; VLM2Vec's published video layouts, eval ``video.yaml``)::

    ROOT/video-tasks/<Task>/task.json   {"family": <parser>, "category": RET|CLS|QA, "rows",
                                         "frames", "videos", "split": "test", "instruction"}
    ROOT/video-tasks/<Task>/<split>.parquet           the row table; split = train | test
    ROOT/video-tasks/frames/<family>/<Task>/<video_id>/frame_0000.png ...   every frame, PNG
    ROOT/video-tasks/videos/<family>/<Task>/<video_id>.mp4   only with mp4=True (PyAV, 1 fps)

``task.json`` is the descriptor :mod:`rematch.evaluation.mmeb_v2.tasks` reads for a task of
one's own; its paths are relative to ROOT and its split is the one evaluated (``test``).
Frames of one clip are numbered from 0000 in time order (VLM2Vec sorts a frame directory
naturally). The mp4 holds the same frames at 1 frame per second, so sampling it at the
default ``video_fps=1.0`` gives back the frame directory.

=================  ==============  =========  ========  =============================================
task               MMEB-V2 parser  family     category  row columns (published ones first)
=================  ==============  =========  ========  =============================================
ShapesVideoRet     msrvtt          video_ret  RET       video_id, video ("<video_id>.mp4", relative to
                   (MSR-VTT)                            the videos root), caption (str): text -> video;
                                                        the candidates are every video of the split
ShapesMotionCLS    ssv2            video_cls  CLS       video_id, pos_text (label), neg_text (list of
                   (SmthSmthV2)                         ALL candidate labels, pos_text among them, as
                                                        VLM2Vec's ssv2 reader ranks neg_text)
ShapesVideoQA      nextqa          video_qa   QA        video (the video id), question, answer (int
                   (NExTQA)                             index into a0..a4), qid, type, a0 .. a4
=================  ==============  =========  ========  =============================================

Extra columns readers ignore: ``clip`` (the clip as JSON: start scene, mover, direction, step,
n_frames) and ``target`` (JSON: what the caption / label / question asserts). Captions are unique
within a split of ShapesVideoRet and no caption is true of another clip of that split, so its
text -> video retrieval has exactly one right answer.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from PIL import Image

from rematch.world.scenes import (
    COLOURS,
    GAP,
    GRID,
    SHAPES,
    Scene,
    ShapeObject,
    object_radius,
    random_scene,
    render,
    scene_from_dict,
    scene_is_valid,
    scene_to_dict,
)
from rematch.world.v2_layout import VIDEO_DIR, write_table, write_task_descriptor

SPLITS = ("train", "test")
#: Direction -> unit step on the lattice (image y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
#: Where a move in each direction leaves the mover relative to what it passed.
END_RELATION = {"left": "left of", "right": "right of", "up": "above", "down": "below"}
FRAME_COUNTS = (4, 8)
STEPS = (2, 3)  # lattice cells per frame: 3.5-5 px at a 56 px frame
STILL = "it does not move"
QA_OPTIONS = 5  # NExTQA's a0..a4
FPS = 1.0
FRAME_SIDE_RANGE = (28, 1024)
#: Clips per task and split: ShapesVideoRet needs captions no other clip satisfies, and there
#: are a few thousand such captions at most (measured: 400 clips take 4 s to find).
MAX_CLIPS = 500

#: The published NExTQA prompt (MMEB-V2's video QA tasks share it).
QA_INSTRUCTION = ("Given a video and a question, select the most accurate answer from the provided candidates. "
                  "Return only the exact text of your chosen answer. Question: ")
#: task -> (MMEB-V2 parser it mirrors, frames family directory, report category, instruction)
VIDEO_TASKS: dict[str, tuple[str, str, str, str]] = {
    "ShapesVideoRet": ("msrvtt", "video_ret", "RET", "Find a video that contains the following visual content:"),
    "ShapesMotionCLS": ("ssv2", "video_cls", "CLS", "Which shape moves in the video, and which way?"),
    "ShapesVideoQA": ("nextqa", "video_qa", "QA", QA_INSTRUCTION),
}
class VideoWorldError(ValueError):
    """A video-subset setting that cannot be used: sizes out of range, or mp4 clips without PyAV."""


#: Every motion label (classification vocabulary), in a fixed order.
MOTION_LABELS = tuple(f"a {shape} moves {direction}" for shape in SHAPES for direction in DIRECTIONS)


# ====================================================================== clips as data


@dataclass(frozen=True)
class Clip:
    """One object of ``start`` moves ``step`` lattice cells per frame in ``direction``."""

    start: Scene
    mover: int
    direction: str
    step: int
    n_frames: int

    @property
    def frames(self) -> tuple[Scene, ...]:
        dx, dy = DIRECTIONS[self.direction]
        moving = self.start.objects[self.mover]
        frames = []
        for index in range(self.n_frames):
            shift = index * self.step / GRID
            moved = ShapeObject(moving.colour, moving.shape, moving.size, moving.x + dx * shift, moving.y + dy * shift)
            objects = list(self.start.objects)
            objects[self.mover] = moved
            frames.append(Scene(tuple(objects)))
        return tuple(frames)

    @property
    def end(self) -> Scene:
        return self.frames[-1]

    @property
    def video_id(self) -> str:
        """Content-addressed id: the same clip always gets the same id (and frame directory)."""
        digest = hashlib.blake2b(json.dumps(clip_to_dict(self), sort_keys=True).encode(), digest_size=6)
        return f"clip_{digest.hexdigest()}"


def clip_to_dict(clip: Clip) -> dict:
    return {"start": scene_to_dict(clip.start), "mover": clip.mover, "direction": clip.direction,
            "step": clip.step, "n_frames": clip.n_frames}


def clip_from_dict(data: dict) -> Clip:
    return Clip(scene_from_dict(data["start"]), int(data["mover"]), data["direction"], int(data["step"]),
                int(data["n_frames"]))


def clip_split(clip_or_scene: Clip | Scene) -> str:
    """The split of a clip, from the set of its objects' identities alone (every frame has the same)."""
    scene = clip_or_scene.start if isinstance(clip_or_scene, Clip) else clip_or_scene
    identities = sorted((o.colour, o.shape, o.size) for o in scene.objects)
    digest = hashlib.blake2b(repr(identities).encode(), digest_size=2).digest()
    return SPLITS[digest[0] & 1]


def frame_is_drawable(scene: Scene) -> bool:
    """Inside the canvas and not overlapping: what every frame needs (only the first and last
    frame also need clear relations, since only they are described)."""
    for obj in scene.objects:
        r = object_radius(obj.size)
        if not (r <= obj.x <= 1 - r and r <= obj.y <= 1 - r):
            return False
    objects = scene.objects
    return all(math.hypot(a.x - b.x, a.y - b.y) >= object_radius(a.size) + object_radius(b.size) + GAP - 1e-9
               for i, a in enumerate(objects) for b in objects[i + 1:])


def clip_is_valid(clip: Clip) -> bool:
    lo, hi = FRAME_COUNTS
    if clip.direction not in DIRECTIONS or not lo <= clip.n_frames <= hi or clip.step < 1:
        return False
    if not 2 <= len(clip.start.objects) <= 3 or not 0 <= clip.mover < len(clip.start.objects):
        return False
    frames = clip.frames
    return scene_is_valid(frames[0]) and scene_is_valid(frames[-1]) and all(map(frame_is_drawable, frames))


# ====================================================================== what a sentence says about a clip


@dataclass(frozen=True)
class MotionCaption:
    """"the <mover> moves <direction>" or "the <mover> moves <end relation> the <reference>"."""

    mover: tuple[str, str]  # (colour, shape)
    direction: str
    reference: tuple[str, str] | None = None

    @property
    def text(self) -> str:
        mover = f"the {self.mover[0]} {self.mover[1]}"
        if self.reference is None:
            return f"{mover} moves {self.direction}"
        return f"{mover} moves {END_RELATION[self.direction]} the {self.reference[0]} {self.reference[1]}"

    def to_dict(self) -> dict:
        return {"mover": list(self.mover), "direction": self.direction,
                "reference": list(self.reference) if self.reference else None}


def relational_references(clip: Clip) -> list[int]:
    """Objects the move carries the mover past: it ends in the move's relation to them and did not start there."""
    first, last = clip.frames[0], clip.frames[-1]
    wanted = END_RELATION[clip.direction]
    return [i for i in range(len(first.objects)) if i != clip.mover
            and last.relation(clip.mover, i) == wanted and first.relation(clip.mover, i) != wanted]


def clip_caption(clip: Clip, relational: bool = True) -> MotionCaption:
    """The relational caption when the move passes an object (the first such), else the plain one."""
    mover = clip.start.objects[clip.mover]
    references = relational_references(clip) if relational else []
    reference = clip.start.objects[references[0]] if references else None
    return MotionCaption((mover.colour, mover.shape), clip.direction,
                         (reference.colour, reference.shape) if reference else None)


def caption_describes(caption: MotionCaption, clip: Clip) -> bool:
    """Is ``caption`` true of ``clip``: the named object is the one that moves, in that direction,
    and (for a relational caption) the move carries it into that relation to the reference?"""
    objects = clip.start.objects
    mover = objects[clip.mover]
    if (mover.colour, mover.shape) != caption.mover or clip.direction != caption.direction:
        return False
    if caption.reference is None:
        return True
    return any((objects[i].colour, objects[i].shape) == caption.reference for i in relational_references(clip))


def motion_label(clip: Clip) -> str:
    """The classification label: "a circle moves up"."""
    return f"a {clip.start.objects[clip.mover].shape} moves {clip.direction}"


# ====================================================================== random clips


def random_clip(rng: random.Random, split: str | None = None, relational: bool | None = None,
                max_tries: int = 10_000) -> Clip:
    """A random valid clip of ``split``; ``relational`` True/False asks for a move that does /
    does not carry the mover past another object (None: either)."""
    for _ in range(max_tries):
        start = random_scene(rng, rng.choice((2, 3)))
        if split is not None and clip_split(start) != split:
            continue
        clip = Clip(start, rng.randrange(len(start.objects)), rng.choice(tuple(DIRECTIONS)), rng.choice(STEPS),
                    rng.randint(*FRAME_COUNTS))
        if not clip_is_valid(clip):
            continue
        if relational is not None and bool(relational_references(clip)) != relational:
            continue
        return clip
    raise RuntimeError(f"could not make a valid clip in {max_tries} tries")


def render_clip(clip: Clip, side: int = 56) -> list[Image.Image]:
    """Every frame of ``clip`` as an RGB image of ``side`` x ``side`` pixels."""
    return [render(frame, side) for frame in clip.frames]


# ====================================================================== rows in MMEB-V2's layouts


@dataclass
class VideoTaskRows:
    """One task's rows for one split, and the clips they show (by video id)."""

    task: str
    split: str
    rows: list[dict]
    clips: dict[str, Clip]


def _rng(task: str, split: str, seed: int) -> random.Random:
    return random.Random(f"rematch-world-video/{split}/{task}/{seed}")


def _json(data: dict) -> str:
    return json.dumps(data, sort_keys=True)


def _retrieval_rows(rng: random.Random, split: str, n: int) -> Iterator[tuple[Clip, dict]]:
    """MSR-VTT rows; every caption is true of its own clip only (retrieval has one right answer)."""
    taken: list[tuple[Clip, MotionCaption]] = []
    tries = 0
    while len(taken) < n:
        tries += 1
        if tries > 1000 * max(n, 1):
            raise RuntimeError(f"could not find {n} distinguishable clips for ShapesVideoRet/{split}")
        clip = random_clip(rng, split, relational=rng.random() < 0.5)
        caption = clip_caption(clip)
        if any(caption_describes(caption, other) or caption_describes(other_caption, clip)
               for other, other_caption in taken):
            continue
        taken.append((clip, caption))
        yield clip, {"video_id": clip.video_id, "video": f"{clip.video_id}.mp4", "caption": caption.text,
                     "clip": _json(clip_to_dict(clip)), "target": _json({"kind": "caption", **caption.to_dict()})}


def _classification_rows(rng: random.Random, split: str, n: int) -> Iterator[tuple[Clip, dict]]:
    """SmthSmthV2 rows: rank every motion label (the right one is among neg_text, as in SSv2)."""
    for _ in range(n):
        clip = random_clip(rng, split)
        label = motion_label(clip)
        yield clip, {"video_id": clip.video_id, "pos_text": label, "neg_text": list(MOTION_LABELS),
                     "clip": _json(clip_to_dict(clip)),
                     "target": _json({"kind": "label", "shape": clip.start.objects[clip.mover].shape,
                                      "direction": clip.direction})}


def _qa_rows(rng: random.Random, split: str, n: int) -> Iterator[tuple[Clip, dict]]:
    """NExTQA rows: "Which way does the red circle move?" (a static object's answer is
    "it does not move") or "Which object moves?" (the scene's objects plus absent ones)."""
    for index in range(n):
        clip = random_clip(rng, split)
        objects = clip.start.objects
        if rng.random() < 0.5:
            still = [i for i in range(len(objects)) if i != clip.mover]
            asked = clip.mover if rng.random() < 0.7 else rng.choice(still)
            obj = objects[asked]
            question = f"Which way does the {obj.colour} {obj.shape} move?"
            options = [*DIRECTIONS, STILL]
            answer = clip.direction if asked == clip.mover else STILL
            target = {"kind": "direction", "object": [obj.colour, obj.shape]}
        else:
            question = "Which object moves?"
            present = [f"the {o.colour} {o.shape}" for o in objects]
            absent = [f"the {c} {s}" for c in COLOURS for s in SHAPES if f"the {c} {s}" not in present]
            options = present + rng.sample(absent, QA_OPTIONS - len(present))
            answer = present[clip.mover]
            target = {"kind": "object"}
        rng.shuffle(options)
        row = {"video": clip.video_id, "question": question, "answer": options.index(answer),
               "qid": index, "type": target["kind"]}
        row.update({f"a{i}": option for i, option in enumerate(options)})
        row.update({"clip": _json(clip_to_dict(clip)), "target": _json({**target, "answer": answer})})
        yield clip, row


_BUILDERS: dict[str, Callable[[random.Random, str, int], Iterator[tuple[Clip, dict]]]] = {
    "ShapesVideoRet": _retrieval_rows, "ShapesMotionCLS": _classification_rows, "ShapesVideoQA": _qa_rows}


def generate_video_rows(task: str, split: str, n: int, seed: int = 0) -> VideoTaskRows:
    """``n`` rows of one video task and split (a pure function of the arguments)."""
    if task not in VIDEO_TASKS:
        raise ValueError(f"unknown video task {task!r}; expected one of {list(VIDEO_TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rows, clips = [], {}
    for clip, row in _BUILDERS[task](_rng(task, split, seed), split, n):
        rows.append(row)
        clips[clip.video_id] = clip
    return VideoTaskRows(task, split, rows, clips)


# ====================================================================== writing


def check_video_sizes(clips: int, frame_side: int) -> None:
    """Refuse sizes that cannot make the video subsets, before anything is generated."""
    if isinstance(clips, bool) or not isinstance(clips, int) or not 0 <= clips <= MAX_CLIPS:
        raise VideoWorldError(f"video clips (--video-clips) must be an integer within 0..{MAX_CLIPS}, got {clips!r}")
    low, high = FRAME_SIDE_RANGE
    if isinstance(frame_side, bool) or not isinstance(frame_side, int) or not low <= frame_side <= high \
            or frame_side % 2:
        raise VideoWorldError(f"frame side (--frame-size) must be an even number of pixels within {low}..{high}, "
                         f"got {frame_side!r}")


def write_video_tasks(root: str | Path, clips: int, seed: int = 0, frame_side: int = 56, mp4: bool = False,
                      tasks: Sequence[str] | None = None) -> dict:
    """Write ``clips`` clips per task and split under ``root`` in the layout above; return what
    was written (for the world's manifest). ``mp4`` also encodes each clip with PyAV."""
    check_video_sizes(clips, frame_side)
    tasks = list(VIDEO_TASKS) if tasks is None else list(tasks)
    if mp4:
        require_av()
    root = Path(root)
    unknown = [task for task in tasks if task not in VIDEO_TASKS]
    if unknown:
        raise ValueError(f"unknown video task(s) {unknown}; expected some of {list(VIDEO_TASKS)}")
    summary: dict = {}
    for task in tasks:
        parser, family, category, instruction = VIDEO_TASKS[task]
        frame_root = f"{VIDEO_DIR}/frames/{family}/{task}"
        video_root = f"{VIDEO_DIR}/videos/{family}/{task}"
        counts = {}
        for split in SPLITS:
            made = generate_video_rows(task, split, clips, seed)
            counts[split] = len(made.rows)
            if not made.rows:
                continue
            write_table(root / VIDEO_DIR / task / f"{split}.parquet", made.rows)
            for video_id, clip in made.clips.items():
                frames = render_clip(clip, frame_side)
                write_frames(root / frame_root / video_id, frames)
                if mp4:
                    write_mp4(root / video_root / f"{video_id}.mp4", frames)
        summary[task] = {"parser": parser, "category": category, **counts}
        if clips:
            write_task_descriptor(root / VIDEO_DIR / task, {
                "family": parser, "category": category, "rows": f"{VIDEO_DIR}/{task}", "frames": frame_root,
                "videos": video_root, "split": "test", "instruction": instruction})
    return summary


def write_frames(directory: Path, frames: Sequence[Image.Image]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        frame.save(directory / f"frame_{index:04d}.png", compress_level=1)


def require_av():
    """PyAV, or a clear error saying how to get it."""
    try:
        import av
    except ImportError as error:
        raise VideoWorldError("writing mp4 clips needs PyAV: pip install 'av>=12' (or leave out --video-mp4; "
                           "the PNG frames are always written)") from error
    return av


def write_mp4(path: Path, frames: Sequence[Image.Image], fps: float = FPS) -> None:
    """Encode ``frames`` as an H.264 mp4 (MPEG-4 part 2 where this PyAV lacks an H.264 encoder)."""
    av = require_av()
    from fractions import Fraction

    path.parent.mkdir(parents=True, exist_ok=True)
    codec = next((name for name in ("libx264", "h264", "mpeg4") if name in av.codecs_available), "mpeg4")
    tmp = path.with_name(path.name + ".tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame.convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


__all__ = ["Clip", "DIRECTIONS", "END_RELATION", "MOTION_LABELS", "MotionCaption", "QA_INSTRUCTION", "STILL",
           "VIDEO_TASKS", "VideoTaskRows", "VideoWorldError", "caption_describes", "check_video_sizes", "clip_caption",
           "clip_from_dict", "clip_is_valid", "clip_split", "clip_to_dict", "frame_is_drawable", "generate_video_rows",
           "motion_label", "random_clip", "relational_references", "render_clip", "require_av", "write_frames",
           "write_mp4", "write_video_tasks"]
