"""Adding and deleting items without a rebuild: the result searches like a fresh build of the same items.

Also the rerank scores a search now carries (``SearchHit.rerank_score``, ``rematch search``'s
p(Yes) column and ``--json`` field). Before issue 25 none of this existed: an index could
only be rebuilt from the whole corpus, and a reranked search hid the scores it was
reordered by.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from rematch import Item
from rematch.cli import main
from rematch.retrieval import Index, IndexFormatError, ModelMismatchError, add_to_index, build_index, delete_from_index
from rematch.retrieval.rerank import matching_probabilities
from rematch.world.scenes import Scene, ShapeObject, render
from tests.retrieval.test_index import CountingModel, Interrupt

SHAPES = [("red", "circle"), ("blue", "circle"), ("green", "circle"), ("yellow", "circle"), ("purple", "circle"),
          ("orange", "circle"), ("red", "star"), ("blue", "star")]
QUERIES = [{"text": "a red square"}, {"text": "a small blue circle", "instruction": "Find an image."},
           {"text": "something green"}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    items, ids, metadata = [], [], []
    for colour, shape in SHAPES:
        path = folder / f"{colour}-{shape}.png"
        render(Scene((ShapeObject(colour, shape, "large", 0.5, 0.5),)), side=56).save(path)
        items += [Item(image=str(path)), Item(text=f"a large {colour} {shape}")]
        ids += [f"img-{colour}-{shape}", f"txt-{colour}-{shape}"]
        metadata += [{"colour": colour}, {"colour": colour, "kind": "caption"}]
    return items, ids, metadata


def same_results(index: Index, reference: Index, k: int = 6) -> None:
    """Equal hits (ids, order, metadata) and scores to 1e-4 (vectors encoded in other batches differ in the
    last bits) for every query."""
    for found, expected in zip(index.search(QUERIES, k=k), reference.search(QUERIES, k=k)):
        assert [(hit.id, hit.rank, hit.metadata) for hit in found] == \
            [(hit.id, hit.rank, hit.metadata) for hit in expected]
        np.testing.assert_allclose([hit.score for hit in found], [hit.score for hit in expected], atol=1e-4)


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_add_and_delete_in_memory_equal_a_fresh_build(tiny_model, corpus, index_type):
    items, ids, metadata = corpus
    options = {"index_type": index_type, "nlist": 2} if index_type == "ivf" else {"index_type": index_type}
    index = Index.build(tiny_model, items[:10], ids[:10], metadata[:10], **options)
    index.add(items[10:], ids[10:], metadata[10:])
    assert index.ids == ids and len(index) == 16 and index.manifest["count"] == 16
    same_results(index, Index.build(tiny_model, items, ids, metadata, **options))

    index.delete(["img-red-circle", "txt-blue-circle", "txt-blue-star"])
    kept = [i for i, item_id in enumerate(ids) if item_id not in {"img-red-circle", "txt-blue-circle", "txt-blue-star"}]
    fresh = Index.build(tiny_model, [items[i] for i in kept], [ids[i] for i in kept], [metadata[i] for i in kept],
                        **options)
    assert index.ids == fresh.ids
    same_results(index, fresh)


def test_changes_are_refused_when_they_would_be_wrong(tiny_model, corpus):
    items, ids, metadata = corpus
    index = Index.build(tiny_model, items[:4], ids[:4], metadata[:4])
    with pytest.raises(ValueError, match="already holds id"):
        index.add(items[4:6], [ids[0], "new"])
    with pytest.raises(ValueError, match="no item with id"):
        index.delete(["img-red-circle", "nope"])
    assert index.ids == ids[:4]  # nothing half-done
    with pytest.raises(ValueError, match="empty index"):
        index.delete(ids[:4])
    with pytest.raises(ValueError, match="no model"):
        Index(index.faiss_index, index.records, index.manifest).add(items[4:5])


def test_add_to_an_index_on_disk_is_verified_and_resumes(tiny_model, corpus, tmp_path):
    items, ids, metadata = corpus
    out = tmp_path / "index"
    build_index(tiny_model, items[:6], ids[:6], out, metadata=metadata[:6], shard_size=4, log=None)
    fresh = Index.build(tiny_model, items, ids, metadata)

    def stop_after_first(shard: int, total: int) -> None:
        if shard == 0:
            raise Interrupt("simulated crash")

    counting = CountingModel(tiny_model)
    with pytest.raises(Interrupt):
        add_to_index(counting, out, items[6:], ids[6:], metadata=metadata[6:], shard_size=4,
                     on_shard_done=stop_after_first, log=None)
    assert counting.items == 4
    meanwhile = Index.load(out, model=tiny_model)  # the old index still loads and serves while the add is pending
    assert meanwhile.ids == ids[:6]

    counting.items = 0
    added = add_to_index(counting, out, items[6:], ids[6:], metadata=metadata[6:], shard_size=4, log=None)
    assert counting.items == 6  # only the shards the crash left unfinished; the old items never again
    assert not (out / "shards").exists()
    loaded = Index.load(out, model=tiny_model, verify=True)
    assert loaded.ids == ids and added.ids == ids
    same_results(loaded, fresh)

    delete_from_index(out, ["txt-red-circle", "img-orange-circle"], log=None)
    remaining = [i for i, item_id in enumerate(ids) if item_id not in {"txt-red-circle", "img-orange-circle"}]
    same_results(Index.load(out, model=tiny_model, verify=True),
                 Index.build(tiny_model, [items[i] for i in remaining], [ids[i] for i in remaining],
                             [metadata[i] for i in remaining]))


def test_an_update_refuses_a_damaged_index_or_another_model(tiny_model, corpus, tmp_path):
    from rematch import ReMatchModel

    items, ids, _ = corpus
    out = tmp_path / "index"
    Index.build(tiny_model, items[:4], ids[:4]).save(out)
    with pytest.raises(ModelMismatchError):
        add_to_index(ReMatchModel.tiny(seed=9), out, items[4:6], ids[4:6], log=None)
    faiss_file = out / "index.faiss"
    data = bytearray(faiss_file.read_bytes())
    data[-1] ^= 0xFF
    faiss_file.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="content hash"):
        delete_from_index(out, [ids[0]], log=None)
    with pytest.raises(IndexFormatError, match="content hash"):
        add_to_index(tiny_model, out, items[4:6], ids[4:6], log=None)


def test_reranked_hits_carry_the_matching_head_scores(tiny_model, corpus):
    items, ids, metadata = corpus
    index = Index.build(tiny_model, items, ids, metadata)
    (hits,) = index.search("a large red circle", k=6, rerank=4)
    head = [hit for hit in hits if hit.rank <= 4]
    assert all(hit.rerank_score is not None for hit in head) and all(hit.rerank_score is None for hit in hits[4:])
    expected = matching_probabilities(tiny_model, "a large red circle", [index.item(ids.index(hit.id)) for hit in head])
    np.testing.assert_allclose([hit.rerank_score for hit in head], expected, atol=1e-6)
    assert [hit.rerank_score for hit in head] == sorted((hit.rerank_score for hit in head), reverse=True)
    assert "rerank_score" in head[0].as_dict() and "rerank_score" not in hits[5].as_dict()
    (plain,) = index.search("a large red circle", k=3)
    assert all(hit.rerank_score is None for hit in plain)


def test_cli_add_delete_and_search_with_rerank_scores(corpus, tmp_path, capsys):
    items, ids, metadata = corpus

    def write(rows, name):
        path = tmp_path / name
        path.write_text("".join(json.dumps({key: value for key, value in row.items() if value is not None}) + "\n"
                                for row in rows))
        return path

    rows = [{"id": i, "text": item.text, "image": item.image, **meta} for item, i, meta in zip(items, ids, metadata)]
    out = tmp_path / "index"
    common = ["--allow-untrained", "--device", "cpu"]
    assert main(["index", "build", "--model", "tiny", "--corpus", str(write(rows[:10], "first.jsonl")),
                 "--out", str(out), "--no-progress", *common]) == 0
    assert main(["index", "add", "--index", str(out), "--corpus", str(write(rows[10:], "more.jsonl")),
                 "--no-progress", *common]) == 0
    assert "added 6 items" in capsys.readouterr().out
    assert main(["index", "add", "--index", str(out), "--corpus", str(tmp_path / "more.jsonl"), *common]) == 1
    assert "already holds id" in capsys.readouterr().err
    (tmp_path / "gone.txt").write_text("txt-red-circle\n\nimg-blue-circle\n")
    assert main(["index", "delete", "--index", str(out), "--ids-file", str(tmp_path / "gone.txt"),
                 "--ids", "txt-red-star"]) == 0
    assert "deleted 3 items" in capsys.readouterr().out
    assert main(["index", "delete", "--index", str(out), "--ids", "nope"]) == 1
    assert "no item with id" in capsys.readouterr().err

    reference = tmp_path / "reference"
    kept = [row for row in rows if row["id"] not in {"txt-red-circle", "img-blue-circle", "txt-red-star"}]
    assert main(["index", "build", "--model", "tiny", "--corpus", str(write(kept, "kept.jsonl")),
                 "--out", str(reference), "--no-progress", *common]) == 0
    capsys.readouterr()
    answers = []
    for index_dir in (out, reference):
        assert main(["search", "--index", str(index_dir), "--text", "a red circle", "-k", "5", "--rerank", "3",
                     "--json", *common]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert [hit["id"] for hit in answers[0]] == [hit["id"] for hit in answers[1]]
    np.testing.assert_allclose([hit["rerank_score"] for hit in answers[0][:3]],
                               [hit["rerank_score"] for hit in answers[1][:3]], atol=1e-4)
    assert all("rerank_score" not in hit for hit in answers[0][3:])

    assert main(["search", "--index", str(out), "--text", "a red circle", "-k", "4", "--rerank", "2", *common]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "cosine", "p(Yes)"] and len(lines) == 5
    assert [line.split()[2] for line in lines[3:]] == ["-", "-"]  # past the reranked top 2
    assert all(0.0 <= float(line.split()[2]) <= 1.0 for line in lines[1:3])
