"""The built-in world's video clips and page images: determinism, disjoint train/test scenes,
captions / labels / answers that follow the scene data (checked here from object positions,
not from the generator's own helpers), frames that change where the object moves, pages that
draw the sentence their qrels say answers a query, and layouts read back with plain parquet."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rematch.world.scenes import COLOURS, SHAPES, layout_split, scene_from_dict
from rematch.world.pages import drawn_lines, generate_pages, layout_page, render_page, write_page_tasks
from rematch.world.video_clips import (
    MOTION_LABELS,
    STILL,
    VIDEO_TASKS,
    clip_from_dict,
    generate_video_rows,
    render_clip,
    write_video_tasks,
)

WORDS_FOR_MOVE = {(-1, 0): "left", (1, 0): "right", (0, -1): "up", (0, 1): "down"}
RELATION_AFTER = {"left": "left of", "right": "right of", "up": "above", "down": "below"}


def _rows(task, split, n=24, seed=0):
    return generate_video_rows(task, split, n, seed).rows


def _observed_motion(clip):
    """From the frames' object positions alone: (mover index, direction word, per-frame shifts)."""
    frames = clip.frames
    first, last = frames[0].objects, frames[-1].objects
    moved = [i for i, (a, b) in enumerate(zip(first, last)) if (a.x, a.y) != (b.x, b.y)]
    assert len(moved) == 1, moved
    (mover,) = moved
    shifts = {(round((b.objects[mover].x - a.objects[mover].x) * 32),
               round((b.objects[mover].y - a.objects[mover].y) * 32)) for a, b in zip(frames, frames[1:])}
    assert len(shifts) == 1, shifts  # a steady move
    (dx, dy), = shifts
    unit = (int(np.sign(dx)), int(np.sign(dy)))
    assert 0 in unit and unit != (0, 0)  # along one axis
    return mover, WORDS_FOR_MOVE[unit]


def _relation(scene, i, j):
    a, b = scene.objects[i], scene.objects[j]
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _caption_true_of(caption: str, clip) -> bool:
    """Parse "the C S moves D" / "the C S moves R the C2 S2" and check it against the frames."""
    words = caption.split()
    mover, direction = _observed_motion(clip)
    obj = clip.start.objects[mover]
    if words[:4] != ["the", obj.colour, obj.shape, "moves"]:
        return False
    rest = words[4:]
    if len(rest) == 1:
        return rest[0] == direction
    relation, (colour, shape) = " ".join(rest[:-3]), rest[-2:]
    if relation != RELATION_AFTER[direction]:
        return False
    first, last = clip.frames[0], clip.frames[-1]
    return any((o.colour, o.shape) == (colour, shape) and _relation(last, mover, j) == relation
               and _relation(first, mover, j) != relation for j, o in enumerate(clip.start.objects) if j != mover)


# ---------------------------------------------------------------------- video clips


def test_video_rows_are_deterministic_given_the_seed():
    for task in VIDEO_TASKS:
        assert _rows(task, "test", 10, seed=3) == _rows(task, "test", 10, seed=3)
        assert _rows(task, "test", 10, seed=3) != _rows(task, "test", 10, seed=4)


def test_train_and_test_clips_never_share_a_scene():
    for task in VIDEO_TASKS:
        frames = {}
        for split in ("train", "test"):
            made = generate_video_rows(task, split, 30, seed=1)
            frames[split] = {json.dumps([(o.colour, o.shape, o.size, o.x, o.y) for o in scene.objects])
                             for clip in made.clips.values() for scene in clip.frames}
            assert len(made.clips) == 30 or task != "ShapesVideoRet"  # retrieval clips are all distinct
        assert frames["train"] and frames["test"] and not frames["train"] & frames["test"]


def test_clips_that_share_a_frame_fall_in_the_same_split():
    from dataclasses import replace

    from rematch.world.video_clips import clip_split

    for clip in generate_video_rows("ShapesMotionCLS", "train", 20, seed=6).clips.values():
        later = replace(clip, start=clip.frames[1], n_frames=clip.n_frames - 1)  # shares frames 1..n-1
        other_mover = replace(clip, mover=(clip.mover + 1) % len(clip.start.objects), direction="up")  # shares frame 0
        assert set(later.frames) <= set(clip.frames) and other_mover.frames[0] == clip.frames[0]
        assert clip_split(clip) == clip_split(later) == clip_split(other_mover) == "train"


def test_each_clip_has_two_or_three_objects_one_moving_for_four_to_eight_frames():
    for task in VIDEO_TASKS:
        for clip in generate_video_rows(task, "test", 20).clips.values():
            assert 2 <= len(clip.start.objects) <= 3 and 4 <= len(clip.frames) <= 8
            _observed_motion(clip)


def test_each_caption_describes_its_clip_and_no_other_clip_of_its_split():
    made = generate_video_rows("ShapesVideoRet", "test", 40, seed=2)
    clips = {row["video_id"]: clip_from_dict(json.loads(row["clip"])) for row in made.rows}
    relational = 0
    for row in made.rows:
        assert _caption_true_of(row["caption"], clips[row["video_id"]]), row["caption"]
        others = [clip for video_id, clip in clips.items() if video_id != row["video_id"]]
        assert not any(_caption_true_of(row["caption"], clip) for clip in others), row["caption"]
        relational += " of " in row["caption"] or " above " in row["caption"] or " below " in row["caption"]
    assert 5 <= relational <= 35  # both kinds of caption occur
    assert len({row["caption"] for row in made.rows}) == 40


def test_motion_labels_and_qa_answers_follow_the_frames():
    for row in _rows("ShapesMotionCLS", "test"):
        clip = clip_from_dict(json.loads(row["clip"]))
        mover, direction = _observed_motion(clip)
        assert row["pos_text"] == f"a {clip.start.objects[mover].shape} moves {direction}"
        assert row["neg_text"] == list(MOTION_LABELS) and row["pos_text"] in row["neg_text"]
    kinds = set()
    for row in _rows("ShapesVideoQA", "test", 30):
        clip = clip_from_dict(json.loads(row["clip"]))
        mover, direction = _observed_motion(clip)
        options = [row[f"a{i}"] for i in range(5)]
        answer = options[row["answer"]]
        assert len(set(options)) == 5
        kinds.add(row["type"])
        if row["type"] == "direction":
            asked = row["question"].removeprefix("Which way does the ").removesuffix(" move?")
            mover_name = f"{clip.start.objects[mover].colour} {clip.start.objects[mover].shape}"
            assert answer == (direction if asked == mover_name else STILL)
        else:
            assert row["question"] == "Which object moves?"
            o = clip.start.objects[mover]
            assert answer == f"the {o.colour} {o.shape}"
    assert kinds == {"direction", "object"}


def test_frames_differ_only_where_the_object_moves():
    made = generate_video_rows("ShapesVideoRet", "test", 6, seed=5)
    side = 56
    for clip in made.clips.values():
        mover, _ = _observed_motion(clip)
        frames = [np.asarray(frame, dtype=np.int16) for frame in render_clip(clip, side)]
        for index, (a, b) in enumerate(zip(frames, frames[1:])):
            changed = np.argwhere(np.abs(a - b).sum(axis=2) > 0)
            assert len(changed), f"frame {index} and {index + 1} are identical"
            box = np.zeros((side, side), dtype=bool)  # where the mover is in either frame, 1 px of antialias slack
            for scene in clip.frames[index:index + 2]:
                obj = scene.objects[mover]
                r = {"small": 1 / 16, "large": 1 / 8}[obj.size] * side + 2
                box[max(0, int(obj.y * side - r)):int(obj.y * side + r) + 1,
                    max(0, int(obj.x * side - r)):int(obj.x * side + r) + 1] = True
            assert box[changed[:, 0], changed[:, 1]].all()
        for i, obj in enumerate(clip.start.objects):  # static objects keep their colour at their centre
            if i != mover:
                for frame in frames:
                    assert tuple(frame[int(obj.y * side), int(obj.x * side)]) == COLOURS[obj.colour]


def test_video_layout_reads_back_with_parquet_and_png(tmp_path):
    av = pytest.importorskip("av")
    summary = write_video_tasks(tmp_path, clips=3, seed=0, frame_side=56, mp4=True)
    assert set(summary) == set(VIDEO_TASKS) and all(s["train"] == s["test"] == 3 for s in summary.values())
    config = {task: json.loads((tmp_path / "video-tasks" / task / "task.json").read_text()) for task in VIDEO_TASKS}
    assert {task: entry["family"] for task, entry in config.items()} == {
        "ShapesVideoRet": "msrvtt", "ShapesMotionCLS": "ssv2", "ShapesVideoQA": "nextqa"}
    assert {entry["category"] for entry in config.values()} == {"RET", "CLS", "QA"}
    for task, entry in config.items():
        for split in ("train", "test"):
            rows = pq.read_table(tmp_path / entry["rows"] / f"{split}.parquet").to_pylist()
            assert len(rows) == 3
            for row in rows:
                video_id = row.get("video_id", row.get("video"))
                clip = clip_from_dict(json.loads(row["clip"]))
                assert video_id == clip.video_id
                frame_dir = tmp_path / entry["frames"] / video_id
                names = sorted(p.name for p in frame_dir.iterdir())
                assert names == [f"frame_{i:04d}.png" for i in range(clip.n_frames)]
                expected = render_clip(clip, 56)
                for name, want in zip(names, expected):
                    assert np.array_equal(np.asarray(Image.open(frame_dir / name).convert("RGB")), np.asarray(want))
                with av.open(str(tmp_path / entry["videos"] / f"{video_id}.mp4")) as container:
                    decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
                assert len(decoded) == clip.n_frames
                error = np.abs(np.stack(decoded).astype(float) - np.stack([np.asarray(f) for f in expected])).mean()
                assert error < 12, error  # lossy, but the same pictures
    ret = pq.read_table(tmp_path / "video-tasks" / "ShapesVideoRet" / "test.parquet").to_pylist()
    assert all(row["video"] == f"{row['video_id']}.mp4" for row in ret)


def test_bad_video_sizes_are_refused_before_writing(tmp_path):
    from rematch.world.video_clips import VideoWorldError

    for clips, side, fragment in ((-1, 56, "--video-clips"), (10_000, 56, "--video-clips"), (2, 57, "--frame-size"),
                                  (2, 8, "--frame-size")):
        with pytest.raises(VideoWorldError, match=fragment):
            write_video_tasks(tmp_path / "v", clips=clips, frame_side=side)
    assert not (tmp_path / "v").exists()


# ---------------------------------------------------------------------- pages


def test_pages_are_deterministic_and_train_test_scenes_disjoint():
    assert generate_pages("test", 12, seed=1) == generate_pages("test", 12, seed=1)
    assert generate_pages("test", 12, seed=1) != generate_pages("test", 12, seed=2)
    for split in ("train", "test"):
        assert all(layout_split(page.scene) == split for page in generate_pages(split, 40).pages)


def _page_text(page) -> str:
    return " ".join(drawn_lines(page))


def test_each_query_is_answered_by_the_one_page_its_qrels_name_and_that_page_draws_the_answer():
    made = generate_pages("test", 60, seed=3)
    pages = {page.corpus_id: page for page in made.pages}
    qrels = made.qrels()
    assert {row["score"] for row in qrels} == {1} and len(made.queries) == len(pages)
    assert {q.kind for q in made.queries} >= {"relation", "position"}
    for query in made.queries:
        relevant = [row["corpus-id"] for row in qrels if row["query-id"] == query.query_id]
        assert relevant == [query.page]
        text = _page_text(pages[query.page])
        assert query.sentence in text and query.answer in text
        assert query.answer in (query.sentence if query.kind != "position" else pages[query.page].title)
        others = [_page_text(p) for cid, p in pages.items() if cid != query.page]
        if query.kind == "relation":  # no other page mentions both objects
            named = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"the {c} {s} " in query.query.rstrip("?") + " "]
            assert len(named) == 2 and not any(all(n in other for n in named) for other in others)
        elif query.kind == "position":
            assert not any(query.sentence in other for other in others) and query.answer in text
        else:
            title = query.query.removeprefix("How many objects are in ").removesuffix("?")
            assert title in text and not any(title in other for other in others)


def test_pages_draw_every_line_they_say_they_draw():
    page = generate_pages("test", 3, seed=0).pages[0]
    image = np.asarray(render_page(page).convert("L"))
    placed = layout_page(page)
    assert [text for text, *_ in placed][0] == page.title
    for text, size, x, y in placed:
        band = image[y:y + size + 2, x:x + 260]
        assert (band < 128).any(), text  # ink where the line is
    last = max(y + size for _, size, _, y in placed)
    assert (image[last + 4:] > 250).all()  # and nothing below the text


def test_page_layout_reads_back_with_parquet(tmp_path):
    summary = write_page_tasks(tmp_path, pages=5, seed=0)
    assert summary["ShapesPages"]["test"] == {"pages": 5, "queries": 5}
    config = json.loads((tmp_path / "visdoc-tasks" / "ShapesPages" / "task.json").read_text())
    assert config["family"] == "vidore" and config["split"] == "test"
    (task,) = [tmp_path / directory for directory in config["tables"]]
    for split in ("train", "test"):
        queries = pq.read_table(task / "queries" / f"{split}.parquet").to_pylist()
        corpus = pq.read_table(task / "corpus" / f"{split}.parquet").to_pylist()
        qrels = pq.read_table(task / "qrels" / f"{split}.parquet").to_pylist()
        assert sorted(q["query-id"] for q in queries) == list(range(5))
        assert sorted(c["corpus-id"] for c in corpus) == list(range(5))
        assert all(isinstance(r["query-id"], int) and isinstance(r["corpus-id"], int) for r in qrels)
        by_id = {c["corpus-id"]: c for c in corpus}
        image_root = tmp_path / config["pages"] if split == "test" else task / "images" / "train"
        for row in corpus:
            file_bytes = (image_root / f"{row['corpus-id']}.png").read_bytes()
            assert row["image"]["bytes"] == file_bytes and Image.open(io.BytesIO(file_bytes)).size == (280, 364)
            scene = scene_from_dict(json.loads(row["scene"]))
            assert layout_split(scene) == split
        for query in queries:
            (qrel,) = [r for r in qrels if r["query-id"] == query["query-id"]]
            assert qrel["score"] == 1 and query["answer"] in by_id[qrel["corpus-id"]]["text"]


# ---------------------------------------------------------------------- the command


def test_synth_writes_video_and_pages_beside_the_image_world(tmp_path, capsys):
    from rematch.cli import main
    from rematch.data.mmeb import list_subsets

    out = tmp_path / "world"
    assert main(["data", "synth", "--out", str(out), "--train-rows", "5", "--eval-queries", "1", "--candidates", "4",
                 "--image-size", "28", "--video-clips", "2", "--pages", "3"]) == 0
    printed = capsys.readouterr().out
    assert "ShapesVideoQA" in printed and "ShapesPages" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["video"]["tasks"]["ShapesVideoRet"]["test"] == 2
    assert manifest["visdoc"]["tasks"]["ShapesPages"]["test"]["pages"] == 3
    assert (out / "video-tasks" / "ShapesVideoQA" / "test.parquet").is_file()
    assert list_subsets(out, "test") == ["ShapesCLS", "ShapesGround", "ShapesI2T", "ShapesT2I", "ShapesVQA"]
    assert main(["data", "check", str(out)]) == 0  # the image readers are not confused by the new folders


def test_the_mmeb_v2_readers_find_the_world_tasks_and_their_answers(tmp_path):
    """The two sides of the layout contract meet: ``rematch eval mmeb-v2``'s readers read what
    the world writes, and rank the answer the world's rows name."""
    evaluate = pytest.importorskip("rematch.evaluation.mmeb_v2.evaluate")
    from rematch.evaluation.mmeb_v2.video import read_video_task
    from rematch.evaluation.mmeb_v2.visdoc import read_visdoc_task

    write_video_tasks(tmp_path, clips=3, seed=0)
    write_page_tasks(tmp_path, pages=4, seed=0)
    specs = {spec.name: spec for spec in evaluate.discover_tasks(tmp_path, ["video", "visdoc"])}
    assert sorted(specs) == ["ShapesMotionCLS", "ShapesPages", "ShapesVideoQA", "ShapesVideoRet"]
    assert not any(spec.official for spec in specs.values())
    for task, answer_of in (("ShapesVideoQA", lambda row: row[f"a{row['answer']}"]),
                            ("ShapesMotionCLS", lambda row: row["pos_text"]),
                            ("ShapesVideoRet", lambda row: row["video_id"])):
        read = read_video_task(specs[task], tmp_path)
        rows = pq.read_table(tmp_path / "video-tasks" / task / "test.parquet").to_pylist()
        assert len(read.examples) == len(rows) == 3
        for example, row in zip(read.examples, rows):
            (index,) = example.relevant
            assert read.pool_ids[index] == answer_of(row)
            video = example.query["video"] if isinstance(example.query, dict) else example.query.video
            if video is None:  # text -> video: the video is the candidate
                video = read.pool[index]["video"] if isinstance(read.pool[index], dict) else read.pool[index].video
            assert str(video).endswith(row.get("video_id", row.get("video")))
    docs = read_visdoc_task(specs["ShapesPages"], tmp_path)
    qrels = pq.read_table(tmp_path / "visdoc-tasks" / "ShapesPages" / "qrels" / "test.parquet").to_pylist()
    queries = pq.read_table(tmp_path / "visdoc-tasks" / "ShapesPages" / "queries" / "test.parquet").to_pylist()
    for example, query in zip(docs.examples, queries):
        (index,) = example.relevant
        (qrel,) = [row for row in qrels if row["query-id"] == query["query-id"]]
        assert docs.pool_ids[index] == str(qrel["corpus-id"]) and query["query"] in example.query.text
