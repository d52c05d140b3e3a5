"""MMEB-V2: readers of the published video and document layouts, NDCG@5, the V2 report, and
`eval mmeb-v2` end to end on a tiny real model against a reference computed by hand from the
embeddings the run cached."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rematch import Item
from rematch.cli import main
from rematch.world.scenes import Scene, ShapeObject, render
from rematch.data.validation import BadRowReport, DataError
from rematch.encoding.cache import EmbeddingCache, embedding_key
from rematch.evaluation.metrics import ndcg_at_k, ranks_of_relevant, relevant_ranks
from rematch.evaluation.mmeb_v2 import OFFICIAL_TASKS, discover_tasks, evaluate_mmeb_v2, summarize_v2
from rematch.evaluation.mmeb_v2.report import SCOPE_CUSTOM, official_layout_row, render_markdown_v2
from rematch.evaluation.mmeb_v2.tasks import DOCUMENT_CANDIDATE, DOCUMENT_QUERY, QA_PROMPT
from rematch.evaluation.mmeb_v2.video import read_video_task
from rematch.evaluation.mmeb_v2.visdoc import read_visdoc_task
from rematch.encoding.cache import encoding_settings, item_settings, video_settings
from rematch.evaluation.settings import video_sampling
from rematch.instructions import as_written, document_items

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "red", "blue"]
SHAPES = ["circle", "square", "triangle", "star", "circle", "square", "star", "triangle"]


def picture(number: int, side: int = 56) -> Image.Image:
    x = 0.3 + 0.05 * (number % 5)
    return render(Scene((ShapeObject(COLOURS[number % 8], SHAPES[number % 8], "large", x, 0.5),)), side=side)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_frames(directory: Path, first: int, count: int = 2) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for frame in range(count):
        picture(first + frame, side=28).save(directory / f"frame_{frame:04d}.jpg")


# ---------------------------------------------------------------------- fixtures in the published layouts

def write_image_tasks(root: Path) -> None:
    """MMEB-eval rows (what `eval mmeb` reads) under image-tasks/."""
    images = root / "image-tasks" / "images"
    images.mkdir(parents=True)
    for number in range(4):
        picture(number).save(images / f"p{number}.png")
    placeholder = "<|image_1|> Represent the given image with the following question: what colour is the shape?"
    write_jsonl(root / "image-tasks" / "VOC2007" / "test.jsonl", [
        {"qry_text": placeholder, "qry_img_path": f"images/p{n}.png",
         "tgt_text": [COLOURS[n], COLOURS[n + 1], "black"], "tgt_img_path": ["", "", ""]} for n in range(3)])
    write_jsonl(root / "image-tasks" / "MSCOCO_t2i" / "test.jsonl", [
        {"qry_text": f"Find me an everyday image that matches the given caption: a {COLOURS[n]} {SHAPES[n]}",
         "qry_img_path": "", "tgt_text": ["<|image_1|>"] * 3,
         "tgt_img_path": [f"images/p{n}.png", f"images/p{(n + 1) % 4}.png", f"images/p{(n + 2) % 4}.png"]}
        for n in range(3)])


QUERIES = ["Which page shows the red circle?", "Where is the blue square?", "What does page three say?"]
#: query -> {page: grade}: graded (2 = the answer, 1 = related), so NDCG@5 is graded
GRADED_QRELS = {"q0": {"p0": 2, "p3": 1}, "q1": {"p1": 2, "p6": 1, "p2": 1}, "q2": {"p2": 1}}


def write_visdoc_tasks(root: Path) -> dict[str, dict]:
    """Two document tasks in BEIR form: ViDoRe (HF parquet shards, pages embedded as bytes, graded
    qrels, a zero-score judgement) and VisRAG (jsonl tables, pages as files named by the corpus)."""
    vidore = root / "visdoc-tasks" / "arxivqa_test_subsampled_beir"  # the HF snapshot's directory name
    write_parquet(vidore / "corpus" / "test-00000-of-00001.parquet",
                  [{"corpus-id": n, "image": {"bytes": png_bytes(picture(n)), "path": None}} for n in range(7)])
    write_parquet(vidore / "queries" / "test-00000-of-00001.parquet",
                  [{"query-id": n, "query": text} for n, text in enumerate(QUERIES)])
    qrels = [{"query-id": int(q[1:]), "corpus-id": int(p[1:]), "score": g}
             for q, pages in GRADED_QRELS.items() for p, g in pages.items()]
    qrels.append({"query-id": 2, "corpus-id": 5, "score": 0})  # judged not relevant: ignored
    write_parquet(vidore / "qrels" / "test-00000-of-00001.parquet", qrels)

    visrag = root / "visdoc-tasks" / "VisRAG_ChartQA"
    visrag.mkdir(parents=True)
    for number in range(6):
        picture(number + 2).save(visrag / f"chart_{number}.png")
    write_jsonl(visrag / "corpus.jsonl", [{"corpus-id": f"chart_{n}.png", "image": f"chart_{n}.png"}
                                          for n in range(6)])
    write_jsonl(visrag / "queries.jsonl", [{"query-id": f"c{n}", "query": f"chart number {n}"} for n in range(4)])
    write_jsonl(visrag / "qrels.jsonl", [{"query-id": f"c{n}", "corpus-id": f"chart_{n}.png", "score": 1}
                                         for n in range(4)])
    # the relevance each query should get, by corpus id as the tables write it
    return {"ViDoRe_arxivqa": {q: {p[1:]: g for p, g in pages.items()} for q, pages in GRADED_QRELS.items()},
            "VisRAG_ChartQA": {f"c{n}": {f"chart_{n}.png": 1} for n in range(4)}}


def write_video_tasks(root: Path) -> None:
    """A few video tasks as the VLM2Vec rows + the MMEB-V2 frame directories lay them out."""
    frames = root / "video-tasks" / "frames"
    # MSR-VTT: text -> video over all the task's videos (rows in the HF config directory test_1k)
    write_jsonl(root / "video-tasks" / "MSR-VTT" / "test_1k" / "test.jsonl", [
        {"video_id": f"video{n}", "video": f"video{n}.mp4", "caption": f"a {COLOURS[n]} {SHAPES[n]} moves"}
        for n in range(3)])
    for n in range(3):
        write_frames(frames / "video_ret" / "MSR-VTT" / f"video{n}", n)
    # HMDB51: classification against all labels (labels.txt gives the full label set)
    write_jsonl(root / "video-tasks" / "HMDB51" / "test.jsonl", [
        {"video_id": f"clip{n}", "pos_text": label} for n, label in enumerate(["wave", "jump", "wave"])])
    (root / "video-tasks" / "HMDB51" / "labels.txt").write_text("wave\njump\nrun\n")
    for n in range(3):
        write_frames(frames / "video_cls" / "HMDB51" / f"clip{n}", n)
    # SmthSmthV2: each video against its own options (neg_text holds the answer too)
    write_jsonl(root / "video-tasks" / "SmthSmthV2" / "test.jsonl", [
        {"video_id": 7, "pos_text": "Pushing something", "neg_text": ["Pulling something", "Pushing something"]}])
    write_frames(frames / "video_cls" / "SSv2" / "7", 0)
    # Video-MME: lettered options, the answer is a letter
    write_jsonl(root / "video-tasks" / "Video-MME" / "test.jsonl", [
        {"videoID": "vm1", "question": "What moves?", "options": ["A. a circle", "B. a square"], "answer": "B",
         "question_id": "1", "domain": "d", "sub_category": "s"}])
    write_frames(frames / "video_qa" / "Video-MME" / "vm1", 1)
    # QVHighlight: <frames>/<video>/query is the query video, positive*/negative* the clips
    write_jsonl(root / "video-tasks" / "QVHighlight" / "test.jsonl", [{"query": "the shape turns", "video_path":
                                                                        "videos/long1.mp4"}])
    for clip in ("query", "negative_0", "positive", "negative_1"):
        write_frames(frames / "video_mret" / "QVHighlight" / "long1" / clip, len(clip))
    # MomentSeeker: several correct clips
    write_jsonl(root / "video-tasks" / "MomentSeeker" / "test.jsonl", [
        {"query": "the red one", "input_frames": "", "positive_frames": [{"output_path": "a/p1.mp4"},
                                                                         {"output_path": "a/p2.mp4"}],
         "negative_frames": [{"output_path": "a/n1.mp4"}]}])
    for clip in ("a_p1", "a_p2", "a_n1"):
        write_frames(frames / "video_mret" / "MomentSeeker" / "video_frames" / clip, len(clip))


@pytest.fixture()
def data_root(tmp_path) -> Path:
    root = tmp_path / "mmeb-v2"
    write_image_tasks(root)
    write_visdoc_tasks(root)
    write_video_tasks(root)
    return root


def as_mapping(item) -> dict:
    return item if isinstance(item, dict) else {"text": item.text, "image": item.image,
                                                "video": getattr(item, "video", None)}


# ---------------------------------------------------------------------- NDCG@5 with graded relevance

def test_ndcg_at_5_with_graded_relevance_equals_hand_values():
    # six candidates ranked by score; grades 2 at rank 2, 1 at rank 4, 3 at rank 6 (outside the top 5)
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    grades = np.array([[0.0, 2.0, 0.0, 1.0, 0.0, 3.0]])
    dcg = 2 / math.log2(3) + 1 / math.log2(5)           # 1.2618595 + 0.4306766
    ideal = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)   # 3 + 1.2618595 + 0.5
    value = ndcg_at_k(relevant_ranks(scores, grades), 5)[0]
    assert value == pytest.approx(dcg / ideal) and value == pytest.approx(0.355436, abs=1e-6)
    # the ideal order scores 1; one relevant page at rank 1 of several scores less than 1 when others exist
    assert ndcg_at_k(relevant_ranks(np.array([[0.3, 0.9, 0.1, 0.8]]), np.array([[1.0, 3.0, 0.0, 2.0]])), 5)[0] == 1.0
    single = ndcg_at_k(relevant_ranks(np.array([[0.9, 0.1, 0.2]]), np.array([[1.0, 1.0, 0.0]])), 5)[0]
    # found at ranks 1 and 3 (a wrong page at 2); the ideal has them at 1 and 2
    assert single == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))
    # ties: list order (the official stand-in) credits the earlier candidate; the strict rule does not
    index, grade = np.array([[1]]), np.array([[2.0]])
    tied = np.array([[0.5, 0.5, 0.1]])
    assert ndcg_at_k(ranks_of_relevant(tied, index, grade, ties="list_order"), 5)[0] == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k(ranks_of_relevant(tied, index, grade, ties="pessimistic"), 5)[0] == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k(ranks_of_relevant(np.array([[0.5, 0.5]]), np.array([[0]]), np.array([[1.0]]),
                                       ties="list_order"), 5)[0] == 1.0


# ---------------------------------------------------------------------- readers

def test_document_reader_keeps_graded_qrels_and_extracts_embedded_pages(data_root):
    task = read_visdoc_task(OFFICIAL_TASKS["ViDoRe_arxivqa"], data_root)
    assert task.pool_ids == [str(n) for n in range(7)]
    pages = data_root / "visdoc-tasks" / "ViDoRe_arxivqa"  # the harness's image_root for this task
    assert [item.image for item in task.pool] == [str(pages / f"{n}.png") for n in range(7)]
    assert Image.open(task.pool[3].image).size == (56, 56)
    assert [as_mapping(e.query)["text"] for e in task.examples] == [f"{DOCUMENT_QUERY} {q}" for q in QUERIES]
    relevant = [{task.pool_ids[i]: g for i, g in e.relevant.items()} for e in task.examples]
    assert relevant == [{"0": 2.0, "3": 1.0}, {"1": 2.0, "6": 1.0, "2": 1.0}, {"2": 1.0}]  # score 0 dropped
    assert all(e.candidates is None for e in task.examples)  # ranked against the whole corpus

    visrag = read_visdoc_task(OFFICIAL_TASKS["VisRAG_ChartQA"], data_root)
    assert len(visrag.pool) == 6 and len(visrag.examples) == 4


def test_video_readers_build_video_items_from_the_published_layouts(data_root):
    frames = data_root / "video-tasks" / "frames"
    msrvtt = read_video_task(OFFICIAL_TASKS["MSR-VTT"], data_root)
    assert [as_mapping(item)["video"] for item in msrvtt.pool] == [
        str(frames / "video_ret" / "MSR-VTT" / f"video{n}") for n in range(3)]
    first = msrvtt.examples[0]
    assert as_mapping(first.query)["text"].startswith("Find a video that contains the following visual content: a red")
    assert first.candidates is None and first.relevant == {0: 1.0}

    hmdb = read_video_task(OFFICIAL_TASKS["HMDB51"], data_root)
    assert hmdb.pool_ids == ["wave", "jump", "run"]  # the label file's full label set, in its order
    assert [e.relevant for e in hmdb.examples] == [{0: 1.0}, {1: 1.0}, {0: 1.0}]
    query = as_mapping(hmdb.examples[1].query)
    assert query["video"] == str(frames / "video_cls" / "HMDB51" / "clip1") and "actions" in query["text"]

    ssv2 = read_video_task(OFFICIAL_TASKS["SmthSmthV2"], data_root)
    (example,) = ssv2.examples
    assert [ssv2.pool_ids[i] for i in example.candidates] == ["Pulling something", "Pushing something"]
    assert example.relevant == {example.candidates[1]: 1.0}

    mme = read_video_task(OFFICIAL_TASKS["Video-MME"], data_root)
    (example,) = mme.examples
    assert [mme.pool[i].text for i in example.candidates] == ["a circle", "a square"]
    assert example.relevant == {example.candidates[1]: 1.0}
    assert as_mapping(example.query)["text"] == f"{QA_PROMPT.strip()} What moves?\nA. a circle\nB. a square"

    moments = read_video_task(OFFICIAL_TASKS["QVHighlight"], data_root)
    (example,) = moments.examples
    clips = [Path(moments.pool_ids[i]).name for i in example.candidates]
    assert clips == ["negative_0", "negative_1", "positive"]
    assert example.relevant == {example.candidates[2]: 1.0}
    assert as_mapping(example.query)["video"].endswith("long1/query")

    seeker = read_video_task(OFFICIAL_TASKS["MomentSeeker"], data_root)
    (example,) = seeker.examples
    assert sorted(Path(seeker.pool_ids[i]).name for i in example.relevant) == ["a_p1", "a_p2"]
    assert len(example.candidates) == 3


def test_bad_video_and_document_rows_name_file_row_and_field(data_root, tiny_model):
    rows = data_root / "video-tasks" / "MSR-VTT" / "test_1k" / "test.jsonl"
    with rows.open("a") as handle:
        handle.write(json.dumps({"video_id": "gone", "video": "gone.mp4", "caption": "nothing"}) + "\n")
        handle.write(json.dumps({"video_id": "video0", "video": "video0.mp4"}) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl row 3: field 'video_id': video not found: no frames in .*gone"):
        read_video_task(OFFICIAL_TASKS["MSR-VTT"], data_root)
    report = BadRowReport()
    task = read_video_task(OFFICIAL_TASKS["MSR-VTT"], data_root, skip_bad=True, report=report)
    assert len(task.examples) == 3 and report.total == 2
    assert "row 4: field 'caption': missing column" in report.summary()

    mme = data_root / "video-tasks" / "Video-MME" / "test.jsonl"
    write_jsonl(mme, [{"videoID": "vm1", "question": "q", "options": ["A. x", "B. y"], "answer": "E"}])
    with pytest.raises(DataError, match=r"test\.jsonl row 0: field 'answer': answer 'E' is outside the 2 options"):
        read_video_task(OFFICIAL_TASKS["Video-MME"], data_root)

    qrels = data_root / "visdoc-tasks" / "VisRAG_ChartQA" / "qrels.jsonl"
    with qrels.open("a") as handle:
        handle.write(json.dumps({"query-id": "c0", "corpus-id": "chart_99.png", "score": 1}) + "\n")
    with pytest.raises(DataError, match=r"qrels\.jsonl row 4: field 'corpus-id': 'chart_99\.png' is not in the corpus"):
        read_visdoc_task(OFFICIAL_TASKS["VisRAG_ChartQA"], data_root)
    queries = data_root / "visdoc-tasks" / "VisRAG_ChartQA" / "queries.jsonl"
    with queries.open("a") as handle:
        handle.write(json.dumps({"query-id": "lonely", "query": "no judgements"}) + "\n")
    report = BadRowReport()
    task = read_visdoc_task(OFFICIAL_TASKS["VisRAG_ChartQA"], data_root, skip_bad=True, report=report)
    assert len(task.examples) == 4 and report.total == 2
    assert "queries.jsonl row 4: field 'query-id': query 'lonely' has no relevant page" in report.summary()
    # an item the model cannot take (a lone surrogate from a JSON escape) is named by its row before encoding
    write_jsonl(queries, [{"query-id": "c0", "query": "chart \ud800 zero"}])
    with pytest.raises(ValueError, match=r"queries\.jsonl row 0: query: field 'text' holds an invalid character"):
        evaluate_mmeb_v2(tiny_model, data_root, None, tasks=["VisRAG_ChartQA"], skip_bad=True, log=None)
    (data_root / "visdoc-tasks" / "VisRAG_ChartQA" / "chart_1.png").unlink()
    with pytest.raises(DataError, match=r"corpus\.jsonl row 1: field 'image': page image not found"):
        read_visdoc_task(OFFICIAL_TASKS["VisRAG_ChartQA"], data_root, skip_bad=False)


# ---------------------------------------------------------------------- the V2 summary

def test_summary_has_the_official_layout_and_unweighted_means():
    def result(modality, category, score, official=True):
        return {"modality": modality, "category": category, "score": score, "official": official, "count": 10}

    results = {"VOC2007": result("image", "CLS", 0.2), "ImageNet-1K": result("image", "CLS", 0.4),
               "MSCOCO_t2i": result("image", "RET", 0.9),
               "MSR-VTT": result("video", "RET", 0.5),
               "ViDoRe_arxivqa": result("visdoc", "VDRv1", 0.6), "VisRAG_ChartQA": result("visdoc", "VR", 0.8),
               "MyPages": result("visdoc", "OOD", 0.0, official=False)}
    summary = summarize_v2(results)
    image = summary["modalities"]["image"]
    assert image["categories"]["CLS"]["score"] == pytest.approx(0.3)
    # a modality's Overall is the mean over its tasks (0.5), not over its category means (0.6)
    assert image["score"] == pytest.approx(0.5)
    assert summary["modalities"]["visdoc"]["score"] == pytest.approx(0.7)  # the own task stays out
    assert summary["all"] == {"score": pytest.approx((0.2 + 0.4 + 0.9 + 0.5 + 0.6 + 0.8) / 6), "tasks": 6}
    assert summary["custom"]["tasks"] == ["MyPages"]
    assert summary["coverage"]["evaluated"] == 6 and summary["coverage"]["of"] == 78
    assert summary["coverage"]["video"]["evaluated"] == 1 and summary["coverage"]["video"]["of"] == 18
    assert "K700" in summary["coverage"]["video"]["missing"] and summary["coverage"]["complete"] is False
    header, cells = official_layout_row(summary)
    assert header == ["Image CLS", "Image QA", "Image RET", "Image GD", "Image Overall", "Video CLS", "Video QA",
                      "Video RET", "Video MRET", "Video Overall", "VisDoc VDRv1", "VisDoc VDRv2", "VisDoc VR",
                      "VisDoc OOD", "VisDoc Overall", "All"]
    assert cells == ["30.00", "—", "90.00", "—", "50.00", "—", "—", "50.00", "—", "50.00", "60.00", "—",
                     "80.00", "—", "70.00", "56.67"]
    markdown = render_markdown_v2(summary)
    assert "6 of 78 MMEB-V2 tasks were evaluated" in markdown and "| MyPages (own) | OOD |" in markdown
    only_own = summarize_v2({"MyPages": results["MyPages"]})
    assert only_own["scope"] == SCOPE_CUSTOM and only_own["all"]["score"] == 0.0


def test_the_registry_has_the_78_tasks_of_the_official_report():
    counts = {}
    for spec in OFFICIAL_TASKS.values():
        counts[(spec.modality, spec.category)] = counts.get((spec.modality, spec.category), 0) + 1
    assert counts == {("image", "CLS"): 10, ("image", "QA"): 10, ("image", "RET"): 12, ("image", "GD"): 4,
                      ("video", "CLS"): 5, ("video", "QA"): 5, ("video", "RET"): 5, ("video", "MRET"): 3,
                      ("visdoc", "VDRv1"): 10, ("visdoc", "VDRv2"): 4, ("visdoc", "VR"): 6, ("visdoc", "OOD"): 4}


# ---------------------------------------------------------------------- end to end, against a hand-computed reference

def cached_vectors(model, cache_dir: Path, items, role: str) -> np.ndarray:
    """The vectors a run cached for ``items``, keyed as the run keyed them: the input limits, and for
    a video the harness's 8-frame sampling that ``evaluate_mmeb_v2`` switches on for the run."""
    cache = EmbeddingCache(cache_dir, model.fingerprint())
    with video_sampling(model, 8):
        keys = [embedding_key(item, role, item_settings(item, encoding_settings(model), video_settings(model)))
                for item in items]
    found = cache.get_many(keys)
    cache.close()
    assert len(found) == len(keys), "the run should have cached every item it encoded"
    return np.stack([found[key] for key in keys])


def hand_ndcg5(ranked_ids: list[str], grades: dict[str, float]) -> float:
    dcg = sum(grades.get(doc, 0.0) / math.log2(position + 2) for position, doc in enumerate(ranked_ids[:5]))
    ideal = sum(g / math.log2(position + 2) for position, g in enumerate(sorted(grades.values(), reverse=True)[:5]))
    return dcg / ideal


def test_eval_mmeb_v2_summary_equals_a_hand_computed_reference(tiny_model, data_root, tmp_path):
    truth = write_visdoc_tasks(tmp_path / "unused")  # the qrels, by id, as written
    out, cache = tmp_path / "out", tmp_path / "cache"
    summary = evaluate_mmeb_v2(tiny_model, data_root, out, modalities=["image", "visdoc"], cache_dir=cache, log=None)
    config = tiny_model.config

    reference = {}
    # documents: NDCG@5 over the whole corpus, by the textbook formula, from the cached vectors
    corpora = {"ViDoRe_arxivqa": ([str(n) for n in range(7)],
                                  [data_root / "visdoc-tasks" / "ViDoRe_arxivqa" / f"{n}.png" for n in range(7)]),
               "VisRAG_ChartQA": ([f"chart_{n}.png" for n in range(6)],
                                  [data_root / "visdoc-tasks" / "VisRAG_ChartQA" / f"chart_{n}.png" for n in range(6)])}
    texts = {"ViDoRe_arxivqa": QUERIES, "VisRAG_ChartQA": [f"chart number {n}" for n in range(4)]}
    for task, (ids, paths) in corpora.items():
        pages = as_written([Item(text=DOCUMENT_CANDIDATE, image=str(p)) for p in paths], config)
        queries = [Item(text=f"{DOCUMENT_QUERY} {text}") for text in texts[task]]
        scores = cached_vectors(tiny_model, cache, queries, "query") @ cached_vectors(tiny_model, cache, pages,
                                                                                      "document").T
        values = []
        for row, query_id in enumerate(truth[task]):
            ranked = [ids[i] for i in sorted(range(len(ids)), key=lambda i: -scores[row, i])]
            values.append(hand_ndcg5(ranked, truth[task][query_id]))
        reference[task] = float(np.mean(values))
    # images: hit@1 = the answer (candidate 0) has the highest score in its own list
    for task in ("VOC2007", "MSCOCO_t2i"):
        rows = [json.loads(line) for line in (data_root / "image-tasks" / task / "test.jsonl").read_text().splitlines()]
        hits = []
        for row in rows:
            image_root = data_root / "image-tasks"
            query_image = str(image_root / row["qry_img_path"]) if row["qry_img_path"] else None
            query = Item(text=row["qry_text"], image=query_image)
            candidates = [Item(text=text if text.strip() else None, image=str(image_root / path) if path else None)
                          for text, path in zip(row["tgt_text"], row["tgt_img_path"])]
            candidates = document_items(candidates, task, config)
            scores = cached_vectors(tiny_model, cache, candidates, "document") @ \
                cached_vectors(tiny_model, cache, [query], "query")[0]
            hits.append(float(int(np.argmax(scores)) == 0))
        reference[task] = float(np.mean(hits))

    for task, value in reference.items():
        assert summary["tasks"][task]["score"] == pytest.approx(value, abs=1e-5), task
        assert json.loads((out / f"{task}.json").read_text())["score"] == pytest.approx(value, abs=1e-5)
    image = summary["modalities"]["image"]
    assert image["categories"]["CLS"]["score"] == pytest.approx(reference["VOC2007"], abs=1e-5)
    assert image["score"] == pytest.approx((reference["VOC2007"] + reference["MSCOCO_t2i"]) / 2, abs=1e-5)
    visdoc = summary["modalities"]["visdoc"]
    assert visdoc["categories"]["VDRv1"]["score"] == pytest.approx(reference["ViDoRe_arxivqa"], abs=1e-5)
    assert visdoc["categories"]["VR"]["score"] == pytest.approx(reference["VisRAG_ChartQA"], abs=1e-5)
    assert summary["all"]["score"] == pytest.approx(np.mean(list(reference.values())), abs=1e-5)
    assert summary["all"]["tasks"] == 4 and "video" not in summary["modalities"]
    assert summary["tasks"]["ViDoRe_arxivqa"]["relevant_per_query"]["max"] == 3
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["all"]["score"] == pytest.approx(summary["all"]["score"])
    assert "| Image CLS | Image QA |" in (out / "summary.md").read_text()
    # a second run is served from the same embedding cache and scores the same
    again = evaluate_mmeb_v2(tiny_model, data_root, None, modalities=["image", "visdoc"], cache_dir=cache, log=None)
    assert again["throughput"]["items_encoded"] == 0 and again["throughput"]["items_from_cache"] > 0
    assert again["all"]["score"] == summary["all"]["score"]


VIDEO_TASKS = ["MSR-VTT", "HMDB51", "SmthSmthV2", "Video-MME", "QVHighlight", "MomentSeeker"]


@pytest.mark.skipif("video" not in Item.__dataclass_fields__, reason="needs Item.video (contract item 1)")
def test_video_tasks_score_as_a_hand_computed_reference(tiny_model, data_root, tmp_path):
    """hit@1 of global pools, own candidate lists and several correct clips, by hand from the cached vectors:
    a query is a hit when its highest-scoring candidate (the first one on a tie) is a correct one."""
    from rematch.data.items import as_item

    cache = tmp_path / "cache"
    summary = evaluate_mmeb_v2(tiny_model, data_root, tmp_path / "out", modalities=["video"], cache_dir=cache,
                               log=None)
    assert sorted(summary["tasks"]) == sorted(VIDEO_TASKS)
    reference = {}
    for name in VIDEO_TASKS:
        task = read_video_task(OFFICIAL_TASKS[name], data_root)
        hits = []
        for example in task.examples:
            indices = list(range(len(task.pool))) if example.candidates is None else list(example.candidates)
            documents = as_written([as_item(task.pool[i]) for i in indices], tiny_model.config)
            query = cached_vectors(tiny_model, cache, [as_item(example.query)], "query")[0]
            scores = cached_vectors(tiny_model, cache, documents, "document") @ query
            hits.append(float(indices[int(np.argmax(scores))] in example.relevant))
        reference[name] = float(np.mean(hits))
        assert summary["tasks"][name]["score"] == pytest.approx(reference[name], abs=1e-6), name
    video = summary["modalities"]["video"]
    # group scores are rounded to 6 decimals, as every score in the JSON files
    assert video["categories"]["CLS"]["score"] == pytest.approx((reference["HMDB51"] + reference["SmthSmthV2"]) / 2,
                                                                abs=1e-5)
    assert video["categories"]["MRET"]["score"] == pytest.approx(
        (reference["QVHighlight"] + reference["MomentSeeker"]) / 2, abs=1e-5)
    assert video["score"] == pytest.approx(np.mean(list(reference.values())), abs=1e-5)
    assert summary["tasks"]["MSR-VTT"]["ranking"] == "global" and summary["tasks"]["QVHighlight"]["ranking"] == "local"
    assert summary["tasks"]["MomentSeeker"]["relevant_per_query"]["max"] == 2


def test_cli_runs_named_tasks_and_reports_a_bad_row_with_its_file(data_root, tmp_path, capsys, cli_error):
    out = tmp_path / "run"
    common = ["eval", "mmeb-v2", "--model", "tiny", "--allow-untrained", "--data", str(data_root), "--out", str(out),
              "--no-cache", "--input-limits", "model"]
    assert main(common + ["--tasks", "VisRAG_ChartQA", "MSCOCO_t2i"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["tasks"]) == ["MSCOCO_t2i", "VisRAG_ChartQA"]
    assert "All" in capsys.readouterr().out
    error = cli_error(common + ["--tasks", "NoSuchTask"])
    assert "unknown task 'NoSuchTask'" in error
    error = cli_error(common + ["--tasks", "MSR-VTT", "--modalities", "visdoc"])
    assert "MSR-VTT is a video task" in error
    with (data_root / "visdoc-tasks" / "VisRAG_ChartQA" / "qrels.jsonl").open("a") as handle:
        handle.write(json.dumps({"query-id": "c1", "corpus-id": "chart_1.png", "score": "high"}) + "\n")
    error = cli_error(common + ["--tasks", "VisRAG_ChartQA"])
    assert "qrels.jsonl row 4: field 'score': must be a number" in error, error
    assert main(common + ["--tasks", "VisRAG_ChartQA", "--skip-bad", "--overwrite"]) == 0
    assert json.loads((out / "VisRAG_ChartQA.json").read_text())["skipped_rows"] == 1


def test_discovery_finds_every_task_the_root_holds(data_root):
    names = [spec.name for spec in discover_tasks(data_root)]
    assert sorted(names) == sorted(["VOC2007", "MSCOCO_t2i", "ViDoRe_arxivqa", "VisRAG_ChartQA", "MSR-VTT", "HMDB51",
                                    "SmthSmthV2", "Video-MME", "QVHighlight", "MomentSeeker"])
    assert [s.name for s in discover_tasks(data_root, ["visdoc"])] == ["ViDoRe_arxivqa", "VisRAG_ChartQA"]


def test_a_task_of_ones_own_is_read_from_its_descriptor_and_kept_out_of_the_official_means(data_root, tiny_model):
    import shutil

    own = data_root / "visdoc-tasks" / "MyCharts"
    shutil.copytree(data_root / "visdoc-tasks" / "VisRAG_ChartQA", own)
    (own / "task.json").write_text(json.dumps({"family": "visrag", "category": "charts"}))
    (spec,) = [s for s in discover_tasks(data_root, ["visdoc"]) if s.name == "MyCharts"]
    assert not spec.official and spec.instruction == DOCUMENT_QUERY and spec.pages == "visdoc-tasks/MyCharts"
    summary = evaluate_mmeb_v2(tiny_model, data_root, None, tasks=["VisRAG_ChartQA", "MyCharts"], log=None)
    # the same rows under another name: same score, but only the benchmark task is in the means
    assert summary["tasks"]["MyCharts"]["score"] == summary["tasks"]["VisRAG_ChartQA"]["score"]
    assert summary["all"]["tasks"] == 1 and summary["custom"]["tasks"] == ["MyCharts"]
    (own / "task.json").write_text(json.dumps({"family": "nosuch", "category": "x"}))
    with pytest.raises(DataError, match=r"MyCharts/task\.json: task MyCharts: reader family 'nosuch'"):
        discover_tasks(data_root)


WORKER = """
import json, sys
import torch
torch.set_num_threads(1)
from rematch import ReMatchModel
from rematch.distributed import rank_and_world, torchrun_session
from rematch.evaluation.mmeb_v2 import evaluate_mmeb_v2

with torchrun_session():
    rank, world = rank_and_world()
    model = ReMatchModel.tiny(size="tiny", backbone="qwen2_vl", num_tokens=16, seed=0)
    summary = evaluate_mmeb_v2(model, sys.argv[1], sys.argv[2] + "/out", modalities=MODALITIES, log=None)
    with open(f"{sys.argv[2]}/rank{rank}.json", "w") as handle:
        json.dump({"world": world, "summary": summary}, handle)
"""


@pytest.mark.distributed
def test_two_gloo_ranks_give_the_single_process_summary(tiny_model, data_root, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    modalities = ["visdoc", "video"] if "video" in Item.__dataclass_fields__ else ["visdoc"]
    (tmp_path / "worker.py").write_text(WORKER.replace("MODALITIES", repr(modalities)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(data_root), str(tmp_path)],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [process.communicate(timeout=240)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [p.returncode for p in processes] == [0, 0], outputs
    single = evaluate_mmeb_v2(tiny_model, data_root, None, modalities=modalities, log=None)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["world"] == 2
        for name, expected in single["tasks"].items():
            for metric in ("score", "hit@1", "ndcg@5", "mrr"):
                assert result["summary"]["tasks"][name][metric] == pytest.approx(expected[metric], abs=1e-5)
        assert result["summary"]["all"]["score"] == pytest.approx(single["all"]["score"], abs=1e-5)
        # every rank encoded its share; together exactly what one process encodes
        assert result["summary"]["throughput"]["items_encoded"] == single["throughput"]["items_encoded"]
    assert (tmp_path / "out" / "summary.json").is_file()


# ---------------------------------------------------------------------- fidelity II (issue 26)

#: The official harness's candidate texts per task (TIGER-AI-Lab/VLM2Vec, ``TASK_INST_TGT`` of each
#: dataset module): videos and pages carry one, class labels and QA options none.
_VIDEO = "Understand the content of the provided video."
_PAGE = "Understand the content of the provided document image."
OFFICIAL_CANDIDATE_TEXT = {
    **dict.fromkeys(["K700", "SmthSmthV2", "HMDB51", "UCF101", "Breakfast"], ""),
    **dict.fromkeys(["MVBench", "Video-MME", "NExTQA", "EgoSchema", "ActivityNetQA"], ""),
    **dict.fromkeys(["DiDeMo", "MSR-VTT", "MSVD", "VATEX", "YouCook2", "QVHighlight", "Charades-STA"], _VIDEO),
    "MomentSeeker": "Understand the content of the provided video clip.",
}


class RecordingModel:
    """The real model behind a recorder of the document items evaluation hands it."""

    def __init__(self, model):
        self.model, self.config, self.adapter, self.documents = model, model.config, model.adapter, []

    def encode(self, items, role="query", **kwargs):
        if role == "document":
            self.documents += list(items)
        return self.model.encode(items, role=role, **kwargs)

    def fingerprint(self):
        return self.model.fingerprint()


def test_candidate_texts_per_v2_task_equal_the_official_table(tiny_model, data_root):
    expected = {**OFFICIAL_CANDIDATE_TEXT,
                **{name: _PAGE for name, spec in OFFICIAL_TASKS.items() if spec.modality == "visdoc"}}
    actual = {name: spec.candidate_text for name, spec in OFFICIAL_TASKS.items() if spec.modality != "image"}
    assert actual == expected and len(actual) == 42

    # what the readers build and what the model is given: the official text, no target instruction of the model's
    recorder = RecordingModel(tiny_model)
    evaluate_mmeb_v2(recorder, data_root, None, modalities=["video", "visdoc"], log=None)
    tokenizer = tiny_model.processor.tokenizer
    seen = {}
    for item in recorder.documents:
        assert item.instruction == tiny_model.config.system_prompt  # the default system turn, nothing else
        text = tokenizer.decode(tiny_model.prepare([item], role="document").input_ids[0])
        assert "Represent" not in text and "system\nYou are a helpful assistant.<|im_end|>" in text
        kind = "video" if item.video is not None else "page" if item.image is not None else "text"
        seen.setdefault(kind, set()).add(item.text)
    assert seen["page"] == {_PAGE}
    assert seen["video"] == {_VIDEO, OFFICIAL_CANDIDATE_TEXT["MomentSeeker"]}
    labels_and_options = {"wave", "jump", "run", "Pulling something", "Pushing something", "a circle", "a square"}
    assert seen["text"] == labels_and_options  # bare: no prefix, no instruction


def test_a_video_classification_task_scores_against_the_full_label_list(tiny_model, data_root, tmp_path):
    from rematch.data.items import as_item
    from rematch.evaluation.mmeb_v2.video import shipped_labels

    (data_root / "video-tasks" / "HMDB51" / "labels.txt").unlink()  # no label file: the shipped list
    hmdb = shipped_labels("HMDB51")
    assert len(hmdb) == len(set(hmdb)) == 51 and {"wave", "jump", "brush_hair", "flic_flac"} <= set(hmdb)
    sizes = {"K700": 700, "UCF101": 101, "Breakfast": 10, "SmthSmthV2": 174}
    assert {name: len(set(shipped_labels(name))) for name in sizes} == sizes
    task = read_video_task(OFFICIAL_TASKS["HMDB51"], data_root)
    assert task.pool_ids == hmdb  # the full pool, not the two labels the rows use

    cache = tmp_path / "cache"
    summary = evaluate_mmeb_v2(tiny_model, data_root, None, tasks=["HMDB51"], cache_dir=cache, log=None)
    result = summary["tasks"]["HMDB51"]
    assert result["pool_size"] == 51 and result["candidates_per_query"] == {"min": 51, "max": 51, "mean": 51.0}
    labels = cached_vectors(tiny_model, cache, as_written([Item(text=label) for label in hmdb], tiny_model.config),
                            "document")
    hits = []
    for example in task.examples:
        scores = labels @ cached_vectors(tiny_model, cache, [as_item(example.query)], "query")[0]
        hits.append(float(int(np.argmax(scores)) in example.relevant))
    assert result["hit@1"] == pytest.approx(np.mean(hits), abs=1e-6)

    # a label the list does not have is a bad row, never a 52nd candidate
    rows = data_root / "video-tasks" / "HMDB51" / "test.jsonl"
    with rows.open("a") as handle:
        handle.write(json.dumps({"video_id": "clip0", "pos_text": "Wave"}) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl row 3: field 'pos_text': label 'Wave' is not in the task's "
                                        r"label list \(.*HMDB51\.txt\)"):
        read_video_task(OFFICIAL_TASKS["HMDB51"], data_root)
    report = BadRowReport()
    assert len(read_video_task(OFFICIAL_TASKS["HMDB51"], data_root, skip_bad=True, report=report).pool) == 51
    assert report.total == 1


def test_videos_get_the_harness_eight_frames_recorded_in_every_result_and_in_the_cache_key(tiny_model, data_root,
                                                                                           tmp_path):
    from rematch.evaluation.settings import video_sampling

    for n in range(3):  # 20 saved frames per MSR-VTT video
        write_frames(data_root / "video-tasks" / "frames" / "video_ret" / "MSR-VTT" / f"video{n}", n, count=20)
    video = str(data_root / "video-tasks" / "frames" / "video_ret" / "MSR-VTT" / "video0")
    with video_sampling(tiny_model, 8) as record:
        batch = tiny_model.prepare([{"video": video}], role="document")
    assert record == {"rule": "mmeb_v2", "frames": 8, "matches_official": True}
    assert batch.video_timestamps == [[float(i) / tiny_model.config.video_fps for i in (0, 2, 5, 8, 10, 13, 16, 19)]]
    assert tiny_model.adapter.config.video_sampling == "fps"  # the model's own sampling is back

    cache, out = tmp_path / "cache", tmp_path / "out"
    first = evaluate_mmeb_v2(tiny_model, data_root, out, tasks=["MSR-VTT", "VisRAG_ChartQA"], cache_dir=cache,
                             log=None)
    assert first["video_sampling"] == record
    assert all(json.loads((out / f"{name}.json").read_text())["video_sampling"] == record
               for name in ("MSR-VTT", "VisRAG_ChartQA"))
    # another frame count never gets the cached vectors: the three videos are encoded again, nothing else
    four = evaluate_mmeb_v2(tiny_model, data_root, None, tasks=["MSR-VTT", "VisRAG_ChartQA"], cache_dir=cache,
                            video_frames=4, log=None)
    assert four["throughput"]["items_encoded"] == 3
    assert four["tasks"]["MSR-VTT"]["video_sampling"] == {"rule": "mmeb_v2", "frames": 4, "matches_official": False}
    again = evaluate_mmeb_v2(tiny_model, data_root, None, tasks=["MSR-VTT"], cache_dir=cache, log=None)
    assert again["throughput"]["items_encoded"] == 0 and again["all"]["score"] == first["tasks"]["MSR-VTT"]["score"]
    own = evaluate_mmeb_v2(tiny_model, data_root, tmp_path / "own", tasks=["MSR-VTT"], cache_dir=cache,
                           video_frames=None, log=None)
    assert own["video_sampling"]["rule"] == "fps" and not own["video_sampling"]["matches_official"]
    assert "not the official 8 frames" in (tmp_path / "own" / "summary.md").read_text()
    # the command line: --video-frames N (default 8), 0 for the model's own sampling
    for frames, expected in (([], record), (["--video-frames", "4"], four["tasks"]["MSR-VTT"]["video_sampling"]),
                             (["--video-frames", "0"], own["video_sampling"])):
        cli_out = tmp_path / f"cli{len(frames) and frames[1]}"
        assert main(["eval", "mmeb-v2", "--model", "tiny", "--allow-untrained", "--data", str(data_root),
                     "--out", str(cli_out), "--tasks", "MSR-VTT", "--cache-dir", str(cache), *frames]) == 0
        assert json.loads((cli_out / "summary.json").read_text())["video_sampling"] == expected


def write_page_task(directory: Path, first: int) -> None:
    """A page task in BEIR form, pages embedded as bytes (how VLM2Vec/ViDoSeek-page* is published)."""
    write_parquet(directory / "corpus" / "test-00000-of-00001.parquet",
                  [{"corpus-id": f"p{n}", "image": {"bytes": png_bytes(picture(first + n)), "path": None}}
                   for n in range(3)])
    write_parquet(directory / "queries" / "test-00000-of-00001.parquet",
                  [{"query-id": f"q{n}", "query": f"page {n}"} for n in range(3)])
    write_parquet(directory / "qrels" / "test-00000-of-00001.parquet",
                  [{"query-id": f"q{n}", "corpus-id": f"p{n}", "score": 1} for n in range(3)])


def test_page_tasks_read_the_fixed_datasets_when_present_and_the_old_layout_otherwise(tiny_model, data_root):
    visdoc = data_root / "visdoc-tasks"
    write_page_task(visdoc / "ViDoSeek-page", first=0)  # the layout read before 2025-11
    (spec,) = discover_tasks(data_root, tasks=["ViDoSeek-page"])
    assert spec.tables == ("visdoc-tasks/ViDoSeek-page",)
    old = read_visdoc_task(spec, data_root)
    assert [Path(item.image).parent.name for item in old.pool] == ["ViDoSeek-page"] * 3

    write_page_task(visdoc / "ViDoSeek-page-fixed", first=4)  # the corrected dataset, same page ids
    (spec,) = discover_tasks(data_root, tasks=["ViDoSeek-page"])
    assert spec.tables == ("visdoc-tasks/ViDoSeek-page-fixed",) and spec.pages == "visdoc-tasks/ViDoSeek-page-fixed"
    fixed = read_visdoc_task(spec, data_root)
    assert fixed.pool_ids == old.pool_ids
    for old_page, new_page in zip(old.pool, fixed.pool):  # its own pages, never the old copy's of the same id
        assert Path(new_page.image).parent.name == "ViDoSeek-page-fixed"
        assert Path(new_page.image).read_bytes() != Path(old_page.image).read_bytes()
    summary = evaluate_mmeb_v2(tiny_model, data_root, None, tasks=["ViDoSeek-page"], log=None)
    assert summary["tasks"]["ViDoSeek-page"]["data"] == "visdoc-tasks/ViDoSeek-page-fixed"
    assert OFFICIAL_TASKS["MMLongBench-page"].fixed == "MMLongBench-page-fixed"
