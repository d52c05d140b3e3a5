"""The training stream: round trip from the synthetic world on disk, shuffling per epoch,
caps and mixing weights, exact resume, parquet locality and bounded memory."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rematch.data.mmeb import open_train_source
from rematch.world.tasks import write_shapes_dataset
from rematch.data.validation import DataError


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "jsonl", train_rows=30, eval_queries=2,
                                seed=0, num_candidates=5, image_size=56)


@pytest.fixture(scope="module")
def shapes_parquet(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "parquet", train_rows=30, eval_queries=2,
                                seed=0, num_candidates=5, image_size=56, fmt="parquet", row_group_size=2)


def _key(example) -> tuple:
    return example.subset, example.ref.row


def _text_pairs(path):
    """One subset's large text-only training file (no images needed)."""
    return [{"qry": f"query {i}", "qry_image_path": "", "pos_text": f"document {i}", "pos_image_path": ""}
            for i in range(path)]


def test_round_trip_synth_to_disk_to_examples_matches_the_rows(shapes_root, shapes_parquet):
    for root in (shapes_root, shapes_parquet):
        source = open_train_source(str(root), seed=0)
        assert len(source) == 30 and source.rows_per_subset() == {name: 6 for name in source.subset_names}
        for example in source.take(60):
            path = root / example.subset / f"train.{'parquet' if root == shapes_parquet else 'jsonl'}"
            assert example.ref.source == str(path)
            if path.suffix == ".jsonl":
                row = json.loads(path.read_text().splitlines()[example.ref.row])
            else:
                row = pq.read_table(path).slice(example.ref.row, 1).to_pylist()[0]
            assert example.query.text == (row["qry"] or None) and example.positive.text == (row["pos_text"] or None)
            assert example.query.image == (str(root / row["qry_image_path"]) if row["qry_image_path"] else None)
            (negative,) = example.negatives
            assert negative.image == (str(root / row["neg_image_path"]) if row["neg_image_path"] else None)


def test_every_row_once_per_epoch_in_a_fresh_order(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _text_pairs(50)))
    source = open_train_source(str(path), seed=3, window_blocks=1)
    first, second = [e.ref.row for e in source.take(50)], [e.ref.row for e in source.take(50)]
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second and first != list(range(50))


def test_same_seed_same_stream_other_seed_other_stream(shapes_root):
    def stream(seed):
        return [_key(e) for e in open_train_source(str(shapes_root), seed=seed).take(40)]

    assert stream(1) == stream(1) and stream(1) != stream(2)


@pytest.mark.parametrize("fixture", ["shapes_root", "shapes_parquet"])
def test_exact_resume_continues_with_the_next_example(request, fixture):
    root = str(request.getfixturevalue(fixture))
    caps = {"ShapesCLS": 4}
    weights = {"ShapesCLS": 1, "ShapesVQA": 1, "ShapesT2I": 2, "ShapesI2T": 1, "ShapesGround": 0.5}
    reference = open_train_source(root, caps=caps, weights=weights, seed=11)
    reference.take(23)
    state = json.loads(json.dumps(reference.state_dict()))  # survives a JSON checkpoint
    assert len(json.dumps(state)) < 4000
    expected = [_key(e) for e in reference.take(80)]  # runs through several epochs of every subset
    resumed = open_train_source(root, caps=caps, weights=weights, seed=11)
    resumed.load_state_dict(state)
    assert [_key(e) for e in resumed.take(80)] == expected


def test_resume_refuses_a_different_configuration(shapes_root):
    source = open_train_source(str(shapes_root), seed=1)
    source.take(3)
    state = source.state_dict()
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        open_train_source(str(shapes_root), seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="subsets/rows"):
        open_train_source(str(shapes_root), seed=1, caps={"ShapesVQA": 2}).load_state_dict(state)


def test_caps_keep_the_first_rows_and_weights_set_the_mix(shapes_root):
    source = open_train_source(str(shapes_root), caps={"ShapesT2I": 2, "ShapesCLS": 0}, seed=0,
                               weights={"ShapesCLS": 0, "ShapesVQA": 3, "ShapesT2I": 1, "ShapesI2T": 0,
                                        "ShapesGround": 0})
    assert len(source) == 6 + 2  # weight-0 subsets are not drawn from
    drawn = source.take(2000)
    counts = Counter(e.subset for e in drawn)
    assert set(counts) == {"ShapesVQA", "ShapesT2I"}
    assert 0.70 < counts["ShapesVQA"] / 2000 < 0.80
    assert {e.ref.row for e in drawn if e.subset == "ShapesT2I"} == {0, 1}
    with pytest.raises(DataError, match="missing \\['ShapesVQA'"):
        open_train_source(str(shapes_root), weights={"ShapesCLS": 1, "ShapesT2I": 1, "ShapesI2T": 1,
                                                     "ShapesGround": 1})
    with pytest.raises(DataError, match="unknown subset"):
        open_train_source(str(shapes_root), caps={"Nope": 3})


def test_default_mix_is_proportional_to_subset_size(tmp_path):
    for name, n in (("Big", 300), ("Small", 100)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _text_pairs(n)))
    counts = Counter(e.subset for e in open_train_source(str(tmp_path), seed=0).take(4000))
    assert 0.70 < counts["Big"] / 4000 < 0.80


def test_parquet_row_groups_are_decoded_about_once_per_epoch(tmp_path):
    path = tmp_path / "Sub" / "train.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(_text_pairs(2000)), path, row_group_size=100)  # 20 row groups
    source = open_train_source(str(tmp_path), seed=0, window_blocks=4)
    store = source.subsets[0].store
    rows = [e.ref.row for e in source.take(2000)]
    assert sorted(rows) == list(range(2000))
    assert store.decoded_row_groups == 20
    # Each window of 400 consecutive draws touches exactly 4 row groups, in shuffled order.
    windows = [{row // 100 for row in rows[i:i + 400]} for i in range(0, 2000, 400)]
    assert all(len(groups) == 4 for groups in windows) and windows[0] != {0, 1, 2, 3}


def test_memory_stays_bounded_on_a_big_file(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as handle:
        for row in _text_pairs(100_000):
            handle.write(json.dumps({**row, "padding": "x" * 200}) + "\n")
    size = path.stat().st_size
    tracemalloc.start()
    source = open_train_source(str(path), seed=0)
    examples = source.take(500)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(source) == 100_000 and len(examples) == 500
    # The index is ~8 bytes a row; the rows themselves are never held (the file is 31 MB).
    assert peak < 2_000_000, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"


def test_bad_rows_in_the_stream_raise_or_are_skipped_and_counted(tmp_path):
    rows = _text_pairs(20)
    rows[5]["pos_text"] = ""
    rows[9] = {"qry": "no positive columns"}
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"pairs.jsonl row (5|9): field"):
        open_train_source(str(path), seed=0).take(20)
    source = open_train_source(str(path), seed=0, skip_bad=True)
    got = source.take(36)  # two passes over the 18 good rows
    assert Counter(e.ref.row for e in got) == {row: 2 for row in range(20) if row not in (5, 9)}
    assert source.report.counts["empty text"] == 2 and source.report.counts["schema"] == 2
    state = source.state_dict()
    resumed = open_train_source(str(path), seed=0, skip_bad=True)
    resumed.load_state_dict(state)
    assert resumed.report.total == 4  # the counts survive a resume


def test_ranks_split_the_global_stream(shapes_root):
    whole = [_key(e) for e in open_train_source(str(shapes_root), seed=4).take(40)]
    rank0 = [_key(e) for e in open_train_source(str(shapes_root), seed=4, rank=0, world_size=2).take(20)]
    rank1 = [_key(e) for e in open_train_source(str(shapes_root), seed=4, rank=1, world_size=2).take(20)]
    assert rank0 == whole[0::2] and rank1 == whole[1::2]


def test_sharded_parquet_splits_read_as_one_subset_with_per_file_row_ids(tmp_path):
    rows = _text_pairs(30)
    for shard, part in enumerate((rows[:20], rows[20:])):
        path = tmp_path / "Sub" / f"train-{shard:05d}-of-00002.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(part), path, row_group_size=7)
    source = open_train_source(str(tmp_path), seed=0, caps={"Sub": 25})
    examples = source.take(25)
    assert len(source) == 25
    seen = {(e.ref.source.rsplit("/", 1)[-1], e.ref.row, e.query.text) for e in examples}
    assert len(seen) == 25
    assert all(text == f"query {row + (20 if name.startswith('train-00001') else 0)}" for name, row, text in seen)
    assert max(row for name, row, _ in seen if name.startswith("train-00001")) == 4  # the cap ends in shard 2


def test_subset_runs_keep_each_batch_within_one_subset_and_resume(shapes_root):
    source = open_train_source(str(shapes_root), seed=4, subset_run=6)
    subsets = [e.subset for e in source.take(36)]
    runs = [subsets[i:i + 6] for i in range(0, 36, 6)]
    assert all(len(set(run)) == 1 for run in runs)
    assert len({run[0] for run in runs}) > 1  # different batches still come from different subsets
    source.take(4)  # stop in the middle of a run
    state = source.state_dict()
    expected = [(e.subset, e.ref.row) for e in source.take(20)]
    resumed = open_train_source(str(shapes_root), seed=4, subset_run=6)
    resumed.load_state_dict(state)
    assert [(e.subset, e.ref.row) for e in resumed.take(20)] == expected
    with pytest.raises(ValueError, match="subset_run"):
        open_train_source(str(shapes_root), seed=4, subset_run=3).load_state_dict(state)


def test_the_builtin_world_is_made_again_when_its_rows_or_seed_change(tmp_path):
    from rematch.config import load_config
    from rematch.training.batches import resolve_train_source

    def rows_of(root: str) -> int:
        return sum(len(p.read_text().splitlines()) for p in Path(root).glob("*/train.jsonl"))

    def resolve(rows: int, seed: int) -> str:
        config = load_config(None, [f"data.builtin_train_rows={rows}", f"data.builtin_seed={seed}"])
        return resolve_train_source(config, tmp_path, log=lambda *_: None)[0]

    root = resolve(20, 0)
    assert rows_of(root) == 20
    first = (Path(root) / "ShapesCLS" / "train.jsonl").read_text()
    assert rows_of(resolve(30, 0)) == 30
    reseeded = resolve(20, 1)
    assert rows_of(reseeded) == 20 and (Path(reseeded) / "ShapesCLS" / "train.jsonl").read_text() != first
    again = resolve(20, 0)
    assert (Path(again) / "ShapesCLS" / "train.jsonl").read_text() == first
