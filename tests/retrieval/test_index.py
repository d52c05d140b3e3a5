"""FAISS index: build/save/load/search round trips, model identity, resumable shard builds, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rematch import Item, ReMatchModel
from rematch.cli import main
from rematch.world.scenes import Scene, ShapeObject, render
from rematch.retrieval import (
    IncompleteIndexError,
    Index,
    IndexFormatError,
    ModelMismatchError,
    build_index,
)
from rematch.retrieval.index import iter_shard_files

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]


class CountingModel:
    """The real model, with a count of the items it is asked to encode (not a mock: it runs)."""

    def __init__(self, model: ReMatchModel):
        self.model = model
        self.items = 0

    def encode(self, items, **kwargs):
        items = list(items)
        self.items += len(items)
        return self.model.encode(items, **kwargs)

    def fingerprint(self) -> str:
        return self.model.fingerprint()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[Item], list[str], list[dict]]:
    folder = tmp_path_factory.mktemp("corpus")
    items, ids, metadata = [], [], []
    for colour in COLOURS:
        path = folder / f"{colour}.png"
        render(Scene((ShapeObject(colour, "square", "large", 0.5, 0.5),)), side=56).save(path)
        items.append(Item(image=str(path), instruction="Represent the given image."))
        ids.append(f"img-{colour}")
        metadata.append({"colour": colour})
        items.append(Item(text=f"a large {colour} square"))
        ids.append(f"txt-{colour}")
        metadata.append({"colour": colour, "kind": "caption"})
    return items, ids, metadata


QUERIES = [{"text": "a red square"}, {"text": "something blue", "instruction": "Find an image."}]


def brute_force(model, items, queries, k):
    documents = model.encode(items, role="document")
    scores = model.encode(queries, role="query") @ documents.T
    return [list(np.argsort(-row, kind="stable")[:k]) for row in scores], scores


def test_build_save_load_search_round_trip(tiny_model, corpus, tmp_path):
    items, ids, metadata = corpus
    index = Index.build(tiny_model, items, ids, metadata)
    before = index.search(QUERIES, k=5)
    order, scores = brute_force(tiny_model, items, QUERIES, 5)
    for hits, expected, row in zip(before, order, scores):
        assert [hit.id for hit in hits] == [ids[i] for i in expected]
        np.testing.assert_allclose([hit.score for hit in hits], row[expected], atol=1e-5)
        assert [hit.rank for hit in hits] == [1, 2, 3, 4, 5]
    first = before[0][0]
    assert first.metadata["colour"] == metadata[ids.index(first.id)]["colour"]

    index.save(tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["model_fingerprint"] == tiny_model.fingerprint()
    assert manifest["count"] == 12 and manifest["dimension"] == tiny_model.hidden_size
    assert manifest["index_type"] == "flat" and len(manifest["content_hash"]) == 64
    loaded = Index.load(tmp_path / "index", model=tiny_model, verify=True)
    after = loaded.search(QUERIES, k=5)
    assert [[(h.id, h.score, h.rank, h.metadata) for h in hits] for hits in after] == \
        [[(h.id, h.score, h.rank, h.metadata) for h in hits] for hits in before]
    assert loaded.item(ids.index("txt-red")) == Item(text="a large red square")
    # a single query item is one query; k larger than the index returns everything
    assert len(loaded.search("a green square", k=50)[0]) == 12


def test_loading_with_another_model_is_an_error(tiny_model, corpus, tmp_path):
    items, ids, _ = corpus
    Index.build(tiny_model, items[:4], ids[:4]).save(tmp_path / "index")
    other = ReMatchModel.tiny(seed=1)
    with pytest.raises(ModelMismatchError) as caught:
        Index.load(tmp_path / "index", model=other)
    assert tiny_model.fingerprint() in str(caught.value) and other.fingerprint() in str(caught.value)
    without_model = Index.load(tmp_path / "index")
    with pytest.raises(ValueError, match="no model to encode queries"):
        without_model.search("x")


def test_damaged_or_foreign_directories_are_refused(tiny_model, corpus, tmp_path):
    items, ids, _ = corpus
    Index.build(tiny_model, items[:4], ids[:4]).save(tmp_path / "index")
    faiss_file = tmp_path / "index" / "index.faiss"
    data = bytearray(faiss_file.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    faiss_file.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="content hash"):
        Index.load(tmp_path / "index", verify=True)
    (tmp_path / "index" / "items.jsonl").write_text("{}\n")
    with pytest.raises(IndexFormatError, match="size the manifest records"):
        Index.load(tmp_path / "index")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(IndexFormatError, match="refusing to replace"):
        Index.build(tiny_model, items[:2], ids[:2]).save(tmp_path / "home")
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"
    with pytest.raises(IndexFormatError, match="not an index directory"):
        Index.load(tmp_path / "home")


class Interrupt(RuntimeError):
    pass


def test_interrupted_shard_build_resumes(tiny_model, corpus, tmp_path):
    items, ids, metadata = corpus  # 12 items in shards of 5: 3 shards
    reference = build_index(tiny_model, items, ids, tmp_path / "reference", metadata=metadata, shard_size=5,
                            log=None)

    def stop_after_second_shard(shard: int, total: int) -> None:
        if shard == 1:
            raise Interrupt("simulated crash")

    counting = CountingModel(tiny_model)
    out = tmp_path / "index"
    with pytest.raises(Interrupt):
        build_index(counting, items, ids, out, metadata=metadata, shard_size=5, on_shard_done=stop_after_second_shard,
                    log=None)
    assert counting.items == 10
    assert [f.name for f in iter_shard_files(out)] == ["shard-000000.npz", "shard-000001.npz"]
    with pytest.raises(IncompleteIndexError, match="rerun"):  # never loadable half-built
        Index.load(out)

    counting.items = 0
    resumed = build_index(counting, items, ids, out, metadata=metadata, shard_size=5, log=None)
    assert counting.items == 2  # only the last shard was encoded
    assert not (out / "shards").exists()
    assert resumed.faiss_index.ntotal == 12
    np.testing.assert_array_equal(resumed.faiss_index.reconstruct_n(0, 12),
                                  reference.faiss_index.reconstruct_n(0, 12))
    loaded = Index.load(out, model=tiny_model, verify=True)
    expected = Index.load(tmp_path / "reference", model=tiny_model).search(QUERIES, k=4)
    assert [[(h.id, h.score) for h in hits] for hits in loaded.search(QUERIES, k=4)] == \
        [[(h.id, h.score) for h in hits] for hits in expected]

    with pytest.raises(FileExistsError, match="overwrite"):
        build_index(tiny_model, items, ids, out, shard_size=5, log=None)


def test_a_changed_item_re_encodes_only_its_shard(tiny_model, corpus, tmp_path):
    items, ids, _ = corpus
    out = tmp_path / "index"
    counting = CountingModel(tiny_model)

    def stop(shard: int, total: int) -> None:
        if shard == total - 1:
            raise Interrupt("stop before assembling")

    with pytest.raises(Interrupt):
        build_index(counting, items, ids, out, shard_size=4, on_shard_done=stop, log=None)
    changed = list(items)
    changed[5] = Item(text="a different caption")
    counting.items = 0
    build_index(counting, changed, ids, out, shard_size=4, log=None)
    assert counting.items == 4  # shard 1 (items 4-7) only
    other = ReMatchModel.tiny(seed=2)
    counted_other = CountingModel(other)
    build_index(counted_other, changed, ids, out, shard_size=4, overwrite=True, log=None)
    assert counted_other.items == 12  # another model never reuses shards
    assert Index.load(out, model=other).fingerprint == other.fingerprint()


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_approximate_index_types(tiny_model, corpus, tmp_path, index_type):
    items, ids, _ = corpus
    flat = Index.build(tiny_model, items, ids)
    approximate = Index.build(tiny_model, items, ids, index_type=index_type, nlist=2)
    approximate.save(tmp_path / "index")
    loaded = Index.load(tmp_path / "index", model=tiny_model)
    assert loaded.manifest["index_type"] == index_type
    exact = [h.id for h in flat.search(QUERIES[0], k=1)[0]]
    # a small index searched with every list / a wide beam is exact
    found = loaded.search(QUERIES[0], k=1, nprobe=2, ef_search=64)[0]
    assert [h.id for h in found] == exact


def test_cli_build_and_search(tmp_path, corpus, capsys, cli_error):
    items, ids, metadata = corpus
    rows = [{"id": i, "text": item.text, "image": item.image, **meta} for item, i, meta in zip(items, ids, metadata)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n"
                                                   for r in rows))
    out = tmp_path / "index"
    assert main(["index", "build", "--model", "tiny", "--allow-untrained", "--corpus", str(tmp_path / "corpus.jsonl"),
                 "--out", str(out),
                 "--shard-size", "5"]) == 0
    assert "wrote a flat index of 12 items" in capsys.readouterr().out
    assert main(["search", "--allow-untrained", "--index", str(out), "--text", "a red square", "-k", "3",
                 "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert {"id", "score", "text", "image", "colour"} <= set(hits[0])
    assert main(["search", "--allow-untrained", "--index", str(out), "--image", items[0].image, "-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].split()[:2] == ["rank", "cosine"]  # a header names the columns
    assert "fingerprint" in cli_error(["search", "--allow-untrained", "--index", str(out), "--model", "tiny:small",
                                       "--text", "x"])
    assert main(["search", "--allow-untrained", "--index", str(out), "--text", "a red square", "-k", "8",
                 "--json"]) == 0
    first_stage = [h["id"] for h in json.loads(capsys.readouterr().out)]
    assert main(["search", "--allow-untrained", "--index", str(out), "--text", "a red square", "-k", "8",
                 "--rerank", "5", "--json"]) == 0
    reranked = [h["id"] for h in json.loads(capsys.readouterr().out)]
    assert sorted(reranked[:5]) == sorted(first_stage[:5])  # a permutation of the first-stage top 5
    assert reranked[5:] == first_stage[5:]
