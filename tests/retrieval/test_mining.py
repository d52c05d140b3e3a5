"""Hard-negative mining (``rematch mine``): choice rules on known scores, real mining on the shapes
world with a tiny real model, the output layout, and a SIGKILLed run resuming to the same bytes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rematch import ReMatchModel
from rematch.cli import main
from rematch.data.items import Item
from rematch.data.mmeb import iter_train_examples
from rematch.data.records import TrainExample
from rematch.world.tasks import write_shapes_dataset
from rematch.data.validation import DataError
from rematch.retrieval.mining import (
    ContentKeys,
    MiningError,
    MiningSettings,
    build_pool,
    choose_mined,
    mine_negatives,
    normalise_text,
    parse_rank_window,
)

SUBSETS = ["ShapesI2T", "ShapesT2I"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("mining") / "world", train_rows=24, eval_queries=0, seed=2,
                                image_size=28, tasks=SUBSETS)


@pytest.fixture(scope="module")
def small_model() -> ReMatchModel:
    return ReMatchModel.tiny(num_tokens=4, seed=0)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def file_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


# ---------------------------------------------------------------------------- the choice rules, on known scores


@pytest.fixture()
def six_targets(tmp_path, shape_images) -> list[TrainExample]:
    """Six image targets; targets 0 and 1 are the same picture saved under two names (a near-duplicate)."""
    a, b, c = shape_images
    d = a.transpose(0)  # a fourth distinct picture (mirrored)
    paths = []
    for index, image in enumerate([a, a, b, c, d, c]):
        path = tmp_path / f"target{index}.png"
        image.save(path)
        paths.append(str(path))
    texts = ["<|image_1|>\nRepresent the given image.", "<|image_1|>\nA different caption of the same picture."]
    return [TrainExample(query=Item(text=f"query {i}"), positive=Item(text=texts[min(i, 1)], image=path))
            for i, path in enumerate(paths)]


def test_positive_duplicates_window_and_ceiling_on_known_scores(six_targets):
    pool = build_pool(six_targets, ContentKeys())
    assert len(pool) == 5  # target 5 is byte-identical to target 3 with the same text: one candidate
    assert pool.groups[0] == pool.groups[1]  # same bytes, different text: a near-duplicate, not the same item
    candidates = np.eye(5, dtype=np.float32)
    # every row's query scores candidates 0..4 as 1.0, 0.99, 0.97, 0.9, 0.8; row 0's positive is candidate 0
    queries = np.repeat(np.array([[1.0, 0.99, 0.97, 0.9, 0.8]], dtype=np.float32), len(six_targets), axis=0)
    settings = MiningSettings(rank_window=(1, 3), per_row=5, max_ratio=0.95)
    choice = choose_mined(queries, candidates, pool, settings, "Toy")[0]
    # the positive (1.0) and its duplicate (0.99) are gone; ranks 1..3 are candidates 2, 3, 4;
    # candidate 2 scores 0.97 > 0.95 x 1.0 and is dropped by the ceiling
    assert choice.negatives == [3, 4]
    assert choice.ranks == [2, 3]
    assert choice.scores == pytest.approx([0.9, 0.8])
    assert choice.near_duplicates == 1 and choice.over_ceiling == 1

    no_ceiling = choose_mined(queries, candidates, pool, MiningSettings(rank_window=(1, 1), max_ratio=None), "Toy")
    assert no_ceiling[0].negatives == [2]
    beyond = choose_mined(queries, candidates, pool, MiningSettings(rank_window=(4, 9), max_ratio=None), "Toy")
    assert beyond[0].negatives == []  # only three candidates are left after removing the positive's group


def test_the_draw_is_seeded_per_row():
    examples = [TrainExample(query=Item(text=f"q{i}"), positive=Item(text=f"target {i}")) for i in range(12)]
    pool = build_pool(examples, ContentKeys())
    generator = np.random.default_rng(0)
    vectors = generator.normal(size=(12, 8)).astype(np.float32)
    queries = generator.normal(size=(12, 8)).astype(np.float32)

    def picks(seed: int) -> list[list[int]]:
        chosen = choose_mined(queries, vectors, pool, MiningSettings((1, 8), 2, None, seed), "Toy")
        return [choice.negatives for choice in chosen]

    assert picks(0) == picks(0)
    assert picks(0) != picks(1)
    assert all(len(negatives) == 2 and row not in negatives for row, negatives in enumerate(picks(3)))


def test_text_normalisation_and_settings_checks():
    assert normalise_text("<|image_1|>\n  Red   CIRCLE ") == normalise_text("red circle")
    assert parse_rank_window("5:30") == (5, 30)
    for bad in ("30:5", "0:3", "5", "a:b"):
        with pytest.raises(MiningError):
            parse_rank_window(bad)
    with pytest.raises(MiningError, match="max_ratio"):
        MiningSettings(max_ratio=0).validate()


# ---------------------------------------------------------------------------- mining the shapes world


def test_mined_negatives_are_harder_than_random_and_never_the_positive(world, small_model, tmp_path):
    out = tmp_path / "mined"
    first = mine_negatives(small_model, world, out, MiningSettings(rank_window=(1, 3), max_ratio=None),
                           keep_embeddings=True, log=None)
    keys = ContentKeys()
    for report in first.subsets:
        assert report.with_negatives == report.rows == 12 and report.without == 0
        assert report.mean_query_negative > report.mean_query_random  # harder than a random other target
        examples = list(iter_train_examples(str(out), report.subset))
        assert len(examples) == report.rows
        for example in examples:
            (negative,) = example.negatives
            assert keys.duplicate(negative) != keys.duplicate(example.positive)

    # other settings, same model and rows: the kept embeddings are reused, only the choice is redone
    capped = mine_negatives(small_model, world, out, MiningSettings(rank_window=(1, 30)), keep_embeddings=True,
                            log=None)
    assert capped.resumed == []
    for report in capped.subsets:
        assert report.items_encoded == 0
        assert report.with_negatives + report.without == report.rows  # rows without one are counted
        for row in rows_of(Path(report.output)):  # the ceiling: every negative <= 0.95 x its positive's score
            assert all(score <= 0.95 * row["mined_pos_score"] + 1e-6 for score in row["mined_neg_score"])

    # a window past the end of the candidate list: every row is written without a negative, and counted
    (empty,) = mine_negatives(small_model, world, out, MiningSettings(rank_window=(500, 600)),
                              subsets=["ShapesI2T"], log=None).subsets
    assert empty.items_encoded == 0
    assert empty.without == empty.rows == 12 and empty.with_negatives == 0
    assert all(row["neg_text"] == "" and row["neg_image_path"] == "" for row in rows_of(Path(empty.output)))
    assert all(example.negatives == () for example in iter_train_examples(str(out), "ShapesI2T"))


def test_output_layout_keeps_columns_and_resolves_images_from_anywhere(world, tmp_path):
    out = tmp_path / "out"
    result = mine_negatives(None, world, out, MiningSettings(per_row=2, strategy="random"), log=None)
    assert [r.subset for r in result.subsets] == SUBSETS
    source_rows = rows_of(world / "ShapesT2I" / "train.jsonl")
    rows = rows_of(out / "ShapesT2I" / "train.jsonl")
    assert len(rows) == len(source_rows)
    for source, row in zip(source_rows, rows):
        assert row["qry"] == source["qry"] and row["qry_scene"] == source["qry_scene"]
        assert row["source_neg_kind"] == source["neg_kind"] and "neg_kind" not in row  # the old negative's record
        assert row["source_neg_image_path"] == str((world / source["neg_image_path"]).resolve())
        assert Path(row["pos_image_path"]).is_absolute() and Path(row["pos_image_path"]).is_file()
        assert isinstance(row["neg_text"], list) and len(row["neg_image_path"]) == 2
        assert all(Path(path).is_file() for path in row["neg_image_path"])
    # the output root reads like any MMEB-train root; a relocated copy still finds its images
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved)
    examples = list(iter_train_examples(str(moved), "ShapesT2I"))
    assert [len(example.negatives) for example in examples] == [2] * len(rows)
    report = json.loads((out / "mining_report.json").read_text())
    assert report["image_paths"] == "absolute" and set(report["subsets"]) == set(SUBSETS)


def test_bad_rows_stop_the_run_naming_the_row_or_are_skipped_and_counted(tmp_path):
    data = tmp_path / "data" / "Toy"
    data.mkdir(parents=True)
    rows = [{"qry": f"question {i}", "qry_image_path": "", "pos_text": f"answer {i}", "pos_image_path": ""}
            for i in range(4)]
    rows[2]["pos_text"] = 7
    (data / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl row 2: field 'pos_text'"):
        mine_negatives(None, tmp_path / "data", tmp_path / "out", MiningSettings(strategy="random"), log=None)
    result = mine_negatives(None, tmp_path / "data", tmp_path / "out", MiningSettings(strategy="random"),
                            skip_bad=True, log=None)
    assert result.subsets[0].bad_rows == 1 and result.subsets[0].rows == 3
    with pytest.raises(MiningError, match="overwrite the input"):
        mine_negatives(None, tmp_path / "data", tmp_path / "data" / "mined", MiningSettings(strategy="random"),
                       log=None)
    with pytest.raises(MiningError, match="needs a model"):
        mine_negatives(None, tmp_path / "data", tmp_path / "out2", MiningSettings(), log=None)


def test_cli_mine(world, tmp_path, capsys, cli_error):
    assert main(["mine", "--random", "--data", str(world), "--out", str(tmp_path / "out"), "--subsets", "ShapesI2T",
                 "--per-row", "2", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "ShapesI2T" in printed and "mining_report.json" in printed
    rows = rows_of(tmp_path / "out" / "ShapesI2T" / "train.jsonl")
    assert all(len(row["neg_text"]) == 2 for row in rows)
    with pytest.raises(SystemExit, match="--model is required"):
        main(["mine", "--data", str(world), "--out", str(tmp_path / "x")])
    # negatives from random heads would be random
    assert "untrained" in cli_error(["mine", "--model", "tiny", "--data", str(world), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["mine", "--random", "--data", str(world), "--out", str(tmp_path / "x"), "--rank-window", "9:2"])


def test_cli_mine_takes_a_preset_and_records_it_unless_a_flag_overrides_it(world, tmp_path, capsys):
    for name, flags, preset, window, ceiling in [
            ("b3", ["--preset", "b3"], "b3", [30, 130], None),
            ("nv", [], "nv", [5, 30], 0.95),
            ("custom", ["--preset", "b3", "--rank-window", "2:4"], None, [2, 4], None)]:
        out = tmp_path / name
        assert main(["mine", "--random", "--data", str(world), "--out", str(out), "--subsets", "ShapesI2T",
                     *flags]) == 0
        report = json.loads((out / "mining_report.json").read_text())
        assert report.get("preset") == preset
        assert report["settings"]["rank_window"] == window and report["settings"]["max_ratio"] == ceiling
    capsys.readouterr()


# ---------------------------------------------------------------------------- resuming after SIGKILL

_KILLED_RUN = """
import os, signal, sys, torch
torch.set_num_threads(2)
from rematch import ReMatchModel
from rematch.retrieval.mining import MiningSettings, mine_negatives
done = [0]
def on_shard_done(role, shard, shards):
    done[0] += 1
    if done[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
mine_negatives(ReMatchModel.tiny(num_tokens=4, seed=0), sys.argv[1], sys.argv[2], MiningSettings(rank_window=(1, 5)),
               shard_size=8, on_shard_done=on_shard_done, log=None)
"""


def test_a_run_killed_mid_subset_resumes_and_writes_the_same_files(world, small_model, tmp_path):
    settings = MiningSettings(rank_window=(1, 5))
    reference = mine_negatives(small_model, world, tmp_path / "reference", settings, shard_size=8, log=None)
    shards_per_subset = sum(-(-count // 8) for count in (reference.subsets[0].candidates, 12))
    out = tmp_path / "killed"
    kill_at = shards_per_subset + 2  # the first subset is written, the second is two shards in
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(world), str(out), str(kill_at)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "ShapesI2T" / "train.jsonl").is_file() and not (out / "ShapesT2I" / "train.jsonl").exists()

    encoded = []
    resumed = mine_negatives(small_model, world, out, settings, shard_size=8, log=None,
                             on_shard_done=lambda role, shard, shards: encoded.append((role, shard)))
    assert resumed.resumed == ["ShapesI2T"]  # finished subset kept, not mined again
    assert len(encoded) == shards_per_subset - 2  # the killed run's two finished shards were reused
    for name in SUBSETS:
        assert file_bytes(out / name / "train.jsonl") == file_bytes(tmp_path / "reference" / name / "train.jsonl")
    assert not any((out / ".mining").rglob("*.npz"))  # embeddings are dropped once a subset is written


# ---------------------------------------------------------------------------- presets


def test_presets_hold_the_published_windows():
    from rematch.retrieval.mining import PRESETS, mining_preset

    nv, b3 = mining_preset("nv"), mining_preset("b3", seed=3)
    assert (nv.rank_window, nv.vqa_rank_window, nv.max_ratio) == ((5, 30), None, 0.95)
    assert nv == MiningSettings()  # today's default is the "nv" preset
    assert (b3.rank_window, b3.vqa_rank_window, b3.max_ratio, b3.seed) == ((30, 130), (70, 170), None, 3)
    assert b3.window_for("vqa") == (70, 170) and b3.window_for("classification") == (30, 130)
    assert nv.window_for("vqa") == (5, 30) and set(PRESETS) == {"nv", "b3"}
    with pytest.raises(MiningError, match="unknown mining preset 'b4'"):
        mining_preset("b4")
    with pytest.raises(MiningError, match="vqa_rank_window"):
        MiningSettings(vqa_rank_window=(9, 3)).validate()


@pytest.fixture(scope="module")
def text_subsets(tmp_path_factory) -> Path:
    """A VQA subset and a retrieval subset (MMEB names, so their meta-tasks are known), 180 distinct
    text targets each: enough for B3's windows (up to rank 170)."""
    root = tmp_path_factory.mktemp("presets") / "data"
    for subset, word in (("OK-VQA", "answer"), ("MSCOCO_i2t", "caption")):
        rows = [{"qry": f"question {i} about thing {i % 7}", "qry_image_path": "",
                 "pos_text": f"{word} {i} of kind {i % 11}", "pos_image_path": ""} for i in range(180)]
        (root / subset).mkdir(parents=True)
        (root / subset / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_presets_pick_from_their_windows(text_subsets, small_model, tmp_path):
    out = tmp_path / "mined"
    b3 = mine_negatives(small_model, text_subsets, out, "b3", keep_embeddings=True, log=None)
    windows = {"OK-VQA": (70, 170), "MSCOCO_i2t": (30, 130)}
    for report in b3.subsets:
        assert report.with_negatives == report.rows == 180 and report.over_ceiling_dropped == 0  # no ceiling
        first, last = windows[report.subset]
        ranks = [rank for row in rows_of(Path(report.output)) for rank in row["mined_neg_rank"]]
        assert len(ranks) == 180 and all(first <= rank <= last for rank in ranks), report.subset
        assert min(ranks) < first + 30 and max(ranks) > last - 30  # drawn across the window, not one end
    recorded = json.loads((out / "mining_report.json").read_text())
    assert recorded["preset"] == "b3" and recorded["settings"]["vqa_rank_window"] == [70, 170]

    nv = mine_negatives(small_model, text_subsets, out, "nv", keep_embeddings=True, log=None)
    for report in nv.subsets:
        assert report.items_encoded == 0  # same model and rows: the embeddings are reused
        for row in rows_of(Path(report.output)):
            assert all(5 <= rank <= 30 for rank in row["mined_neg_rank"])
            assert all(score <= 0.95 * row["mined_pos_score"] + 1e-6 for score in row["mined_neg_score"])
