"""Whole-corpus retrieval evaluation: qrels formats, metrics against a dense reference, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rematch import Item
from rematch.cli import main
from rematch.world.scenes import Scene, ShapeObject, render
from rematch.evaluation import compute_metrics, evaluate_retrieval, read_qrels
from rematch.retrieval.corpus import CorpusError, read_corpus


@pytest.fixture()
def files(tmp_path):
    for number, colour in enumerate(["red", "blue", "green"]):
        render(Scene((ShapeObject(colour, "circle", "large", 0.5, 0.5),)), side=56).save(tmp_path / f"c{number}.png")
    queries = [{"id": "q1", "text": "a red circle"}, {"id": "q2", "text": "a blue circle"},
               {"id": "q3", "text": "something unjudged"}, {"id": "q4", "image": "c2.png", "text": "<image> similar"}]
    corpus = [{"id": "d1", "image": "c0.png", "source": "camera"}, {"id": "d2", "image": "c1.png"},
              {"id": "d3", "image": "c2.png"}, {"id": "d4", "text": "a circle that is red"},
              {"id": "d5", "text": "a square"}]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td4\t1\nq2\td2\t1\n"
                                        "q2\td5\t0\nq4\td3\t1\n")
    return tmp_path


def test_qrels_formats_agree(files):
    (files / "qrels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"query_id": "q1", "doc_id": "d1", "relevance": 2}, {"query_id": "q1", "doc_id": "d4"},
        {"query_id": "q2", "corpus_id": "d2", "score": 1}, {"query_id": "q2", "doc_id": "d5", "relevance": 0},
        {"query_id": "q4", "doc_id": "d3", "relevance": 1}]))
    (files / "qrels.txt").write_text("q1 0 d1 2\nq1 0 d4 1\nq2 0 d2 1\nq2 0 d5 0\nq4 0 d3 1\n")
    expected = {"q1": {"d1": 2.0, "d4": 1.0}, "q2": {"d2": 1.0, "d5": 0.0}, "q4": {"d3": 1.0}}
    for name in ("qrels.tsv", "qrels.jsonl", "qrels.txt"):
        assert read_qrels(files / name) == expected


def test_bad_qrels_and_corpus_rows_name_file_and_line(files):
    (files / "bad.tsv").write_text("q1\td1\t1\nq1\tnope\t1\n")
    with pytest.raises(CorpusError, match=r"bad\.tsv line 2: document id 'nope' is not in the corpus"):
        read_qrels(files / "bad.tsv", ["q1"], ["d1"])
    (files / "bad2.tsv").write_text("q1\td1\t1\nq1\td1\tx\n")
    with pytest.raises(CorpusError, match=r"bad2\.tsv line 2: relevance 'x' is not a number"):
        read_qrels(files / "bad2.tsv")
    (files / "c.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "b", "image": "nowhere.png"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl line 2: field 'image': image file not found"):
        read_corpus(files / "c.jsonl")
    (files / "d.jsonl").write_text('{"id": "a", "text": "x"}\n\n{"id": "a", "text": "y"}\n')
    with pytest.raises(CorpusError, match=r"d\.jsonl line 3: duplicate id 'a' \(first at .*d\.jsonl line 1\)"):
        read_corpus(files / "d.jsonl")
    (files / "e.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(CorpusError, match=r"e\.jsonl line 1: has neither text nor image"):
        read_corpus(files / "e.jsonl")


def test_metrics_equal_a_dense_reference(tiny_model, files):
    queries, corpus = read_corpus(files / "queries.jsonl"), read_corpus(files / "corpus.jsonl")
    qrels = read_qrels(files / "qrels.tsv", queries.ids, corpus.ids)
    result = evaluate_retrieval(tiny_model, queries.ids, queries.items, corpus.ids, corpus.items, qrels,
                                ks=(1, 2, 5), log=None)
    assert result["queries"] == 3 and result["queries_without_relevant"] == 1 and result["corpus_size"] == 5

    judged = [0, 1, 3]  # q3 has no judgement
    scores = tiny_model.encode([queries.items[i] for i in judged], role="query") @ \
        tiny_model.encode(corpus.items, role="document").T
    relevance = np.zeros((3, 5))
    relevance[0, [0, 3]] = [2, 1]
    relevance[1, 1] = 1
    relevance[2, 2] = 1
    expected = compute_metrics(scores, relevance, hit_ks=(1,), recall_ks=(1, 2, 5), ndcg_ks=(10,))
    assert result["metrics"] == pytest.approx(expected, abs=1e-5)
    assert result["metrics"]["recall@5"] == 1.0  # the whole corpus is 5 documents


def test_cli_retrieval_writes_json(files, capsys):
    out = files / "out"
    assert main(["eval", "retrieval", "--model", "tiny", "--queries", str(files / "queries.jsonl"), "--corpus",
                 str(files / "corpus.jsonl"), "--qrels", str(files / "qrels.tsv"), "--out", str(out), "--no-cache",
                 "--ks", "1", "3", "--json", "--allow-untrained"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / "retrieval.json").read_text())
    assert printed == written
    assert set(written["metrics"]) == {"hit@1", "recall@1", "recall@3", "ndcg@10", "mrr"}
    assert written["throughput"]["items_encoded"] == 3 + 5
    assert main(["eval", "retrieval", "--model", "tiny", "--queries", str(files / "queries.jsonl"), "--corpus",
                 str(files / "corpus.jsonl"), "--qrels", str(files / "qrels.tsv"), "--rerank", "3", "--no-cache",
                 "--ks", "1", "3", "--json", "--allow-untrained"]) == 0
    reranked = json.loads(capsys.readouterr().out)
    assert reranked["rerank"] == 3 and set(reranked["metrics"]) == set(written["metrics"])


def test_items_from_a_directory_of_images(tmp_path):
    (tmp_path / "sub").mkdir()
    render(Scene((ShapeObject("red", "star", "large", 0.5, 0.5),)), side=56).save(tmp_path / "sub" / "a.png")
    render(Scene((ShapeObject("blue", "star", "large", 0.5, 0.5),)), side=56).save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    corpus = read_corpus(tmp_path, instruction="Represent the given image.")
    assert corpus.ids == ["b.jpg", "sub/a.png"]
    assert corpus.items[1] == Item(image=str(tmp_path / "sub" / "a.png"), instruction="Represent the given image.")
