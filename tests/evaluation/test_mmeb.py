"""The MMEB protocol on a real tiny model: known per-subset scores, aggregation, cache, reports, CLI."""

from __future__ import annotations

import json
import re
import os

import numpy as np
import pytest

from rematch import Item, ReMatchModel
from rematch.cli import main
from rematch.data.records import EvalExample, RowRef
from rematch.world.scenes import Scene, ShapeObject, render
from rematch.evaluation import EvalDataError, aggregate, compare_summaries, evaluate_mmeb, load_summary
from rematch.evaluation.report import LEGACY_TIE_RULE, OVERALL_ALL, OVERALL_KNOWN, render_markdown, summarize
from rematch.instructions import document_items

SCENES = [
    Scene((ShapeObject("red", "circle", "large", 0.5, 0.5),)),
    Scene((ShapeObject("blue", "star", "small", 0.3, 0.5), ShapeObject("green", "square", "large", 0.7, 0.5))),
    Scene((ShapeObject("yellow", "triangle", "large", 0.5, 0.3),)),
    Scene((ShapeObject("purple", "circle", "small", 0.5, 0.5),)),
    Scene((ShapeObject("orange", "square", "large", 0.4, 0.6),)),
]


class CountingModel:
    """The real model, with a count of the items it is asked to encode (not a mock: it runs)."""

    def __init__(self, model: ReMatchModel):
        self.model = model
        self.config = model.config  # so evaluation prepares documents exactly as for the model itself
        self.items = 0
        self.calls = 0

    def encode(self, items, **kwargs):
        items = list(items)
        self.calls += 1
        self.items += len(items)
        return self.model.encode(items, **kwargs)

    def fingerprint(self) -> str:
        return self.model.fingerprint()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for number, scene in enumerate(SCENES):
        path = folder / f"scene{number}.png"
        render(scene, side=56).save(path)
        paths.append(str(path))
    return paths


def known_score_examples(subset: str, hits: int, misses: int, pictures: list[str]) -> list[EvalExample]:
    """Examples whose outcome does not depend on the weights.

    A one-candidate list is always a hit (rank 1). A list of three identical copies of the
    answer is an exact three-way tie: the official rule (argmax, candidate 0 first) ranks
    the answer 1st, a hit; the strict rule ranks it 3rd, a miss.
    """
    examples = []
    for number in range(hits + misses):
        query = Item(text=f"{subset} query {number}", image=pictures[number % len(pictures)])
        answer = Item(text=f"answer {number}")
        candidates = (answer,) if number < hits else (answer, answer, answer)
        examples.append(EvalExample(query, candidates, subset, RowRef(f"{subset}.jsonl", number)))
    return examples


def expected_scores(hits: int, misses: int) -> dict:
    count = hits + misses
    return {"hit@1": 1.0, "hit@1_strict": hits / count, "hit@5": 1.0, "mrr": 1.0, "ties_at_top": misses}


KNOWN = {"ImageNet-1K": (2, 2), "Place365": (1, 3), "OK-VQA": (3, 1), "MSCOCO": (2, 0), "MyCustomTask": (0, 2)}


def test_known_per_subset_scores_and_mmeb_aggregation(tiny_model, pictures, tmp_path):
    examples = {name: known_score_examples(name, *counts, pictures) for name, counts in KNOWN.items()}
    summary = evaluate_mmeb(tiny_model, examples, tmp_path, log=None)

    for name, counts in KNOWN.items():
        written = json.loads((tmp_path / f"{name}.json").read_text())
        for metric, value in expected_scores(*counts).items():
            assert written[metric] == pytest.approx(value, abs=1e-6), (name, metric)
        assert written["count"] == sum(counts)
        assert written["positive_duplicates"] == counts[1]
        assert written["tie_rule"] == "official"
    groups = summary["groups"]
    # the strict rule makes the scores differ per subset (the official hit@1 is 1.0 everywhere here):
    # per meta-task: classification = (0.5 + 0.25) / 2; vqa 0.75; grounding 1.0; no retrieval subset
    assert groups["classification"]["hit@1_strict"] == pytest.approx(0.375)
    assert groups["vqa"]["hit@1_strict"] == pytest.approx(0.75)
    assert groups["grounding"]["hit@1_strict"] == pytest.approx(1.0)
    assert "retrieval" not in groups
    # IND = ImageNet-1K, OK-VQA, MSCOCO; OOD = Place365; overall = the four MMEB subsets, unweighted
    assert groups["IND"]["hit@1_strict"] == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    assert groups["OOD"]["hit@1_strict"] == pytest.approx(0.25)
    assert groups["overall"]["hit@1_strict"] == pytest.approx((0.5 + 0.25 + 0.75 + 1.0) / 4)
    assert groups["overall"]["hit@1"] == 1.0
    assert groups["overall"]["subsets"] == ["ImageNet-1K", "MSCOCO", "OK-VQA", "Place365"]
    assert summary["overall_scope"] == OVERALL_KNOWN
    # the unknown subset is its own "other" group and moves no MMEB number
    assert groups["other"] == {"subsets": ["MyCustomTask"], "hit@1": 1.0, "hit@1_strict": 0.0, "hit@5": 1.0,
                               "mrr": 1.0}
    assert summary["mmeb"]["complete"] is False and summary["mmeb"]["evaluated"] == 4
    assert summary["metrics"] == ["hit@1", "hit@1_strict", "hit@5", "mrr"]
    # the Python API keeps the model's own input limits unless told otherwise, and says so
    assert summary["input_limits"] == {"preset": "model", "min_pixels": tiny_model.config.min_pixels,
                                       "max_pixels": tiny_model.config.max_pixels,
                                       "max_text_tokens": tiny_model.config.max_text_tokens,
                                       "matches_official": False}
    assert summary["throughput"]["items_encoded"] > 0 and summary["throughput"]["items_per_second"] > 0

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["groups"]["overall"]["hit@1_strict"] == pytest.approx(0.625)
    report = (tmp_path / "summary.md").read_text()
    assert "| overall | 4 | 100.00 | 62.50 | 100.00 | 1.0000 |" in report
    assert "| MyCustomTask | other | other | 2 |" in report
    assert "ties for the top score" in report and "ImageNet-1K 2" in report
    assert "NOT the official MMEB-V1 values" in report
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aggregation_is_an_unweighted_mean_over_subsets():
    results = {
        "VisDial": {"hit@1": 0.2, "count": 1000},      # retrieval, IND
        "FashionIQ": {"hit@1": 0.6, "count": 10},      # retrieval, OOD
        "GQA": {"hit@1": 0.4, "count": 500},           # vqa, OOD
    }
    groups = aggregate(results)
    assert groups["retrieval"]["hit@1"] == pytest.approx(0.4)  # not weighted by count
    assert groups["OOD"]["hit@1"] == pytest.approx(0.5)
    assert groups["IND"]["hit@1"] == pytest.approx(0.2)
    assert groups["overall"]["hit@1"] == pytest.approx(0.4)
    assert set(groups) == {"retrieval", "vqa", "IND", "OOD", "overall"}


def test_every_summary_has_an_overall():
    def result(name, hit, mrr):
        meta = {"meta_task": "vqa", "split": "OOD"} if name == "GQA" else {"meta_task": "other", "split": "other"}
        return {"subset": name, **meta, "count": 10, "hit@1": hit, "mrr": mrr}

    custom = {"MyTaskA": result("MyTaskA", 0.2, 0.5), "MyTaskB": result("MyTaskB", 0.6, 0.7)}
    summary = summarize(custom)
    # no subset has a known meta-task: overall is the plain mean over all of them
    assert summary["groups"]["overall"] == {"subsets": ["MyTaskA", "MyTaskB"], "hit@1": pytest.approx(0.4),
                                            "mrr": pytest.approx(0.6)}
    assert summary["groups"]["other"]["hit@1"] == pytest.approx(0.4)
    assert summary["overall_scope"] == OVERALL_ALL
    assert "'overall' is the mean over all of them" in render_markdown(summary)
    # one MMEB subset present: overall is over the known subsets only, as before
    mixed = summarize({**custom, "GQA": result("GQA", 0.9, 0.95)})
    assert mixed["groups"]["overall"]["subsets"] == ["GQA"] and mixed["groups"]["overall"]["hit@1"] == 0.9
    assert mixed["overall_scope"] == OVERALL_KNOWN


def mixed_examples(pictures: list[str], count: int = 8) -> list[EvalExample]:
    """Realistic lists: shared candidates across queries, text and image candidates mixed."""
    pool = [Item(text="a red circle"), Item(text="a blue star"), Item(image=pictures[0]),
            Item(image=pictures[1], text="<|image_1|> Represent the given image."), Item(text="yellow"),
            Item(image=pictures[2])]
    rng = np.random.default_rng(1)
    examples = []
    for number in range(count):
        chosen = rng.permutation(len(pool))[:4]
        query = Item(text=f"find item {number}", image=pictures[number % 3] if number % 2 else None)
        examples.append(EvalExample(query, tuple(pool[i] for i in chosen), "VisDial", RowRef("v.jsonl", number)))
    return examples


def test_matches_a_naive_per_query_evaluation(tiny_model, pictures):
    examples = mixed_examples(pictures)
    summary = evaluate_mmeb(tiny_model, {"VisDial": examples}, None, log=None)
    ranks, strict_ranks, argmax = [], [], []
    for example in examples:  # each query alone, its own list encoded as one batch, no dedupe
        query = tiny_model.encode([example.query], role="query")[0]
        documents = document_items(example.candidates, "VisDial", tiny_model.config)  # the subset's instruction
        scores = tiny_model.encode(documents, role="document") @ query
        ranks.append(1 + int((scores[1:] > scores[0]).sum()))
        strict_ranks.append(1 + int((scores[1:] >= scores[0]).sum()))
        argmax.append(int(np.argmax(scores)))  # what the official MMEB script does
    ranks, strict_ranks = np.array(ranks), np.array(strict_ranks)
    result = summary["subsets"]["VisDial"]
    assert result["hit@1"] == pytest.approx(np.mean(np.array(argmax) == 0))
    assert result["hit@1"] == pytest.approx(np.mean(ranks == 1))
    assert result["hit@1_strict"] == pytest.approx(np.mean(strict_ranks == 1))
    assert result["hit@5"] == pytest.approx(np.mean(ranks <= 5))
    assert result["mrr"] == pytest.approx(np.mean(1 / ranks), abs=1e-6)
    assert result["unique_candidates"] <= 6 and result["unique_queries"] == 8


def test_embedding_cache_is_hit_on_the_second_run(tiny_model, pictures, tmp_path):
    examples = mixed_examples(pictures)
    cache = tmp_path / "cache"
    counting = CountingModel(tiny_model)
    first = evaluate_mmeb(counting, {"VisDial": examples}, tmp_path / "a", cache_dir=cache, log=None, plot=False)
    unique = first["subsets"]["VisDial"]["unique_queries"] + first["subsets"]["VisDial"]["unique_candidates"]
    assert counting.items == unique  # each unique item encoded exactly once
    assert first["throughput"]["items_encoded"] == unique

    counting.items = counting.calls = 0
    second = evaluate_mmeb(counting, {"VisDial": examples}, tmp_path / "b", cache_dir=cache, ks=(1, 3),
                           log=None, plot=False)
    assert counting.calls == 0  # a re-run with another metric encodes nothing
    assert second["throughput"]["items_from_cache"] == unique
    for metric in ("hit@1", "mrr"):
        assert second["subsets"]["VisDial"][metric] == first["subsets"]["VisDial"][metric]
    assert "hit@3" in second["subsets"]["VisDial"]

    # replacing one image file invalidates exactly the cached vectors that use it
    users = {item.cache_key() for ex in examples for item in (ex.query, *ex.candidates) if item.image == pictures[2]}
    render(SCENES[4], side=56).save(pictures[2])
    os.utime(pictures[2], ns=(1, 10**18))
    evaluate_mmeb(counting, {"VisDial": examples}, None, cache_dir=cache, log=None)
    assert counting.items == len(users)
    render(SCENES[2], side=56).save(pictures[2])  # restore for the other tests


def test_the_cache_keeps_roles_and_models_apart(tiny_model, tmp_path):
    from rematch.evaluation import CachedEncoder

    item = [Item(text="the same text")]
    encoder = CachedEncoder(tiny_model, tmp_path)
    as_query, as_document = encoder.encode(item, "query"), encoder.encode(item, "document")
    assert encoder.stats.encoded == 2 and not np.allclose(as_query, as_document)
    other = CachedEncoder(ReMatchModel.tiny(seed=1), tmp_path)
    other.encode(item, "query")
    assert other.stats.encoded == 1 and other.stats.cached == 0
    again = CachedEncoder(tiny_model, tmp_path)
    np.testing.assert_array_equal(again.encode(item, "query"), as_query)
    assert again.stats.cached == 1 and again.stats.encoded == 0


def test_bad_examples_name_the_row_and_field(tiny_model, pictures, tmp_path):
    ok = EvalExample(Item(text="q"), (Item(text="a"),), "X", RowRef("x.jsonl", 0))
    missing = EvalExample(Item(text="q2"), (Item(text="a"), Item(image=str(tmp_path / "gone.png"))), "X",
                          RowRef("x.jsonl", 7))
    with pytest.raises(EvalDataError, match=r"x\.jsonl row 7: candidate 1: field 'image': image file not found"):
        evaluate_mmeb(tiny_model, {"X": [ok, missing]}, None, log=None)
    empty = EvalExample(Item(text="q"), (), "X", RowRef("x.jsonl", 3))
    with pytest.raises(EvalDataError, match=r"x\.jsonl row 3: field 'candidates' is empty"):
        evaluate_mmeb(tiny_model, {"X": [ok, empty]}, None, log=None)
    no_content = EvalExample(Item(text="q"), (Item(text="a"), Item()), "X", RowRef("x.jsonl", 4))
    with pytest.raises(ValueError, match=r"x\.jsonl row 4: candidate 1: has neither text nor image"):
        evaluate_mmeb(tiny_model, {"X": [no_content]}, None, log=None)
    with pytest.raises(EvalDataError, match="subset X: no examples"):
        evaluate_mmeb(tiny_model, {"X": []}, None, log=None)
    with pytest.raises(ValueError, match="rerank must be >= 0"):
        evaluate_mmeb(tiny_model, {"X": [ok]}, None, rerank=-1, log=None)


def write_mmeb_eval_file(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_cli_reads_mmeb_eval_files_and_compares_runs(tmp_path, pictures, capsys, cli_error):
    pytest.importorskip("rematch.data.mmeb")
    root = tmp_path / "mmeb"
    image = os.path.relpath(pictures[0], root)
    placeholder = "<|image_1|> Represent the given image."
    # VOC2007 (classification, IND): one-candidate lists -> hit@1 = 1
    write_mmeb_eval_file(root / "VOC2007" / "test.jsonl", [
        {"qry_text": f"{placeholder} {n}", "qry_img_path": image, "tgt_text": ["cat"], "tgt_img_path": [""]}
        for n in range(3)])
    # GQA (vqa, OOD): the answer repeated three times -> exact tie -> official hit@1 = 1, strict 0;
    # and one row with a missing image
    rows = [{"qry_text": f"question {n}", "qry_img_path": "", "tgt_text": [placeholder] * 3,
             "tgt_img_path": [image] * 3} for n in range(2)]
    rows.append({"qry_text": placeholder, "qry_img_path": "missing.png", "tgt_text": ["x"], "tgt_img_path": [""]})
    write_mmeb_eval_file(root / "GQA" / "test.jsonl", rows)
    out, cache = tmp_path / "run", tmp_path / "cache"

    error = cli_error(["eval", "mmeb", "--model", "tiny", "--allow-untrained", "--data", str(root), "--out", str(out),
                       "--cache-dir", str(cache)])
    assert re.search(r"GQA.*row 2.*qry_img_path", error), error
    assert main(["eval", "mmeb", "--model", "tiny", "--allow-untrained", "--data", str(root), "--out", str(out),
                 "--cache-dir", str(cache), "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "items/s" in printed and "1 bad row(s) skipped" in printed
    # what the numbers depend on is said before them
    assert "evaluating with input limits official: images 3136-1003520 px, no text truncation (official MMEB-V1)" \
        in printed and "not reranked" in printed
    summary = load_summary(out)
    assert summary["subsets"]["VOC2007"]["hit@1"] == 1.0 and summary["subsets"]["GQA"]["hit@1"] == 1.0
    assert summary["subsets"]["GQA"]["hit@1_strict"] == 0.0 and summary["subsets"]["GQA"]["ties_at_top"] == 2
    assert summary["subsets"]["GQA"]["skipped_rows"] == 1 and summary["subsets"]["GQA"]["count"] == 2
    assert summary["groups"]["overall"]["hit@1"] == 1.0 and summary["groups"]["overall"]["hit@1_strict"] == 0.5
    assert summary["groups"]["IND"]["hit@1_strict"] == 1.0 and summary["groups"]["OOD"]["hit@1_strict"] == 0.0
    # `eval mmeb` encodes at the official MMEB-V1 input limits unless told otherwise, and records them
    assert summary["input_limits"] == {"preset": "official", "min_pixels": 3136, "max_pixels": 1003520,
                                       "max_text_tokens": 0, "matches_official": True}
    assert summary["subsets"]["GQA"]["input_limits"] == summary["input_limits"]
    for name in ("VOC2007.json", "GQA.json", "summary.json", "summary.md", "summary.png"):
        assert (out / name).is_file()
    # the candidates' target prompt style: the model's own unless --target-prompt-style says otherwise
    assert summary["target_prompt_style"] == "b3"
    assert main(["eval", "mmeb", "--model", "tiny", "--allow-untrained", "--data", str(root), "--out",
                 str(tmp_path / "system"), "--subsets", "VOC2007", "--target-prompt-style", "system"]) == 0
    assert load_summary(tmp_path / "system")["target_prompt_style"] == "system"

    # a second run served from the cache, compared with the first
    second = tmp_path / "run2"
    assert main(["eval", "mmeb", "--model", "tiny", "--allow-untrained", "--data", str(root), "--subsets", "VOC2007",
                 "--out", str(second), "--cache-dir", str(cache), "--compare", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "encoded 0 items" in printed
    assert "VOC2007" in printed and "+0.00" in printed
    table = compare_summaries(load_summary(out), load_summary(second))
    gqa = next(line for line in table.splitlines() if line.startswith("GQA"))
    assert gqa.split()[1:] == ["100.00", "—", "0.00", "—"]  # hit@1 then hit@1_strict; only in the baseline
    assert "note:" not in table  # same tie rule, same input limits
    # compare-only mode: no model, no data
    assert main(["eval", "mmeb", "--out", str(second), "--compare", str(out)]) == 0
    assert "[overall]" in capsys.readouterr().out


def test_eval_mmeb_on_the_builtin_shapes_world(tmp_path, capsys):
    shapes = pytest.importorskip("rematch.world.tasks")
    root = shapes.write_shapes_dataset(tmp_path / "shapes", train_rows=0, eval_queries=3, num_candidates=6,
                                       image_size=56)
    out = tmp_path / "eval"
    assert main(["eval", "mmeb", "--model", "tiny", "--allow-untrained", "--data", str(root), "--out", str(out),
                 "--no-cache"]) == 0
    summary = load_summary(out)
    assert set(summary["subsets"]) == {"ShapesCLS", "ShapesVQA", "ShapesT2I", "ShapesI2T", "ShapesGround"}
    assert {"classification", "vqa", "retrieval", "grounding", "overall"} <= set(summary["groups"])
    assert all(0.0 <= r["hit@1"] <= 1.0 and r["count"] == 3 for r in summary["subsets"].values())
    assert (out / "summary.png").stat().st_size > 1000 and (out / "summary.md").is_file()


def test_comparing_with_a_run_from_before_the_official_tie_rule(tmp_path):
    """An old summary's hit@1 counted ties as misses: it is compared with hit@1_strict, never with hit@1."""
    old = {"primary_metric": "hit@1", "metrics": ["hit@1", "mrr"],
           "groups": {"overall": {"subsets": ["GQA"], "hit@1": 0.25, "mrr": 0.5}},
           "subsets": {"GQA": {"meta_task": "vqa", "split": "OOD", "count": 4, "hit@1": 0.25, "mrr": 0.5}}}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps(old))
    loaded = load_summary(tmp_path / "old")
    assert loaded["tie_rule"] == LEGACY_TIE_RULE
    assert loaded["subsets"]["GQA"]["hit@1_strict"] == 0.25 and "hit@1" not in loaded["subsets"]["GQA"]

    new = {**old, "tie_rule": "official",
           "input_limits": {"preset": "official", "min_pixels": 3136, "max_pixels": 1003520, "max_text_tokens": 0,
                            "matches_official": True},
           "groups": {"overall": {"subsets": ["GQA"], "hit@1": 0.75, "hit@1_strict": 0.5, "mrr": 0.8}},
           "subsets": {"GQA": {"meta_task": "vqa", "split": "OOD", "count": 4, "hit@1": 0.75, "hit@1_strict": 0.5,
                               "mrr": 0.8}}}
    table = compare_summaries(loaded, new, names=("old", "new"))
    gqa = next(line for line in table.splitlines() if line.startswith("GQA"))
    assert gqa.split()[1:] == ["—", "75.00", "25.00", "50.00", "+25.00"]  # strict vs strict: +25, not +50
    assert "note: old predates the official tie rule" in table
    assert "note: the runs used different input limits (old: not recorded; new: 3136-1003520 px" in table


def test_candidates_get_the_subset_document_instruction_unless_the_model_turns_it_off(tiny_model, pictures):
    import dataclasses

    class RecordingModel(CountingModel):
        def __init__(self, model, config):
            super().__init__(model)
            self.config, self.documents = config, []

        def encode(self, items, role="query", **kwargs):
            if role == "document":
                self.documents += list(items)
            return super().encode(items, role=role, **kwargs)

    examples = [EvalExample(Item(text="q"), (Item(image=pictures[0]), Item(text="own", instruction="Mine.")),
                            "VisDial", RowRef("v.jsonl", 0))]
    on = RecordingModel(tiny_model, dataclasses.replace(tiny_model.config, target_prompt_style="system"))
    evaluate_mmeb(on, {"VisDial": examples}, None, log=None)
    assert sorted(item.instruction for item in on.documents) == ["Mine.", "Represent the given image."]
    # the "b3" style (the default): an image target gets no instruction, a text target an inline prefix
    b3 = RecordingModel(tiny_model, tiny_model.config)
    labels = [EvalExample(Item(text="q"), (Item(image=pictures[0]), Item(text="tench")), "ImageNet-1K",
                          RowRef("i.jsonl", 0))]
    summary = evaluate_mmeb(b3, {"ImageNet-1K": labels}, None, log=None)
    assert [(item.text, item.instruction) for item in b3.documents] == [
        (None, None), ("Represent the class label: tench", None)]
    assert summary["target_prompt_style"] == summary["subsets"]["ImageNet-1K"]["target_prompt_style"] == "b3"
    off = RecordingModel(tiny_model, dataclasses.replace(tiny_model.config, document_instructions=False))
    evaluate_mmeb(off, {"VisDial": examples}, None, log=None)
    assert sorted(str(item.instruction) for item in off.documents) == ["Mine.", "None"]
    # a wrapper that hides the model's config cannot be evaluated as that model: an error, not a guess
    with pytest.raises(TypeError, match="has no `config`"):
        evaluate_mmeb(RecordingModel(tiny_model, None), {"VisDial": examples}, None, log=None)


def test_the_embedding_cache_never_stores_or_serves_a_vector_that_is_not_unit_length(tmp_path):
    import sqlite3

    from rematch.encoding.cache import EmbeddingCache, EmbeddingCacheError

    cache = EmbeddingCache(tmp_path, "fp")
    good = np.eye(1, 8, dtype=np.float32)
    with pytest.raises(EmbeddingCacheError, match="not finite unit vectors"):
        cache.put_many(["a", "b"], np.vstack([good, np.zeros((1, 8), dtype=np.float32)]))
    with pytest.raises(EmbeddingCacheError):
        cache.put_many(["c"], np.full((1, 8), np.nan, dtype=np.float32))
    assert len(cache) == 0  # all or nothing
    cache.put_many(["a"], good)
    with sqlite3.connect(cache.path) as connection:  # damage an entry on disk, keeping its size
        connection.execute("UPDATE embeddings SET vector = ? WHERE key = 'a'", (np.zeros(8, np.float32).tobytes(),))
    cache.close()
    with pytest.raises(EmbeddingCacheError, match="entry a is damaged"):
        EmbeddingCache(tmp_path, "fp").get_many(["a"])


def test_subset_names_that_sanitise_alike_get_their_own_result_files():
    from rematch.evaluation.mmeb import subset_file_name

    names = ["a/b", "a_b", "a b", "summary", "ImageNet-1K", "Visual7W-Pointing"]
    files = [subset_file_name(name) for name in names]
    assert len(set(files)) == len(names)
    assert files[1] == "a_b.json" and files[4] == "ImageNet-1K.json" and files[3] != "summary.json"


def test_results_of_another_model_in_the_output_directory_are_refused_or_removed(tmp_path, tiny_model):
    from rematch.evaluation.mmeb import check_output_directory

    (tmp_path / "OldTask.json").write_text(json.dumps({"subset": "OldTask", "model_fingerprint": "other"}))
    (tmp_path / "notes.json").write_text(json.dumps({"mine": True}))  # not a result file: never touched
    (tmp_path / "Same.json").write_text(json.dumps({"subset": "Same", "model_fingerprint": "fp"}))
    with pytest.raises(FileExistsError, match="OldTask.json"):
        check_output_directory(tmp_path, "fp")
    check_output_directory(tmp_path, "fp", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Same.json", "notes.json"]


def test_comparing_with_a_file_that_is_not_a_summary_is_a_clear_error(tmp_path):
    (tmp_path / "summary.json").write_text("[]")
    with pytest.raises(ValueError, match="not an `rematch eval mmeb` summary"):
        load_summary(tmp_path)


def test_a_corrupt_image_is_named_by_its_row_or_skipped_with_it(tmp_path, pictures, capsys, cli_error):
    """A file that exists but does not decode: without --skip-bad the error names the first row
    using it (not the deduplicated item index); with --skip-bad every row using it is skipped
    and counted, and the others are scored."""
    root = tmp_path / "mmeb"
    broken = root / "images" / "broken.png"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(open(pictures[0], "rb").read()[:80])  # a truncated PNG
    good = os.path.relpath(pictures[1], root)
    placeholder = "<|image_1|> Represent the given image."
    rows = [{"qry_text": f"question {n}", "qry_img_path": "", "tgt_text": [placeholder, "a label"],
             "tgt_img_path": [good, ""]} for n in range(2)]
    rows[1:1] = [{"qry_text": "question b", "qry_img_path": "", "tgt_text": ["a label", placeholder],
                  "tgt_img_path": ["", "images/broken.png"]}] * 2  # rows 1 and 2 use the broken file
    write_mmeb_eval_file(root / "GQA" / "test.jsonl", rows)
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ["eval", "mmeb", "--model", "tiny", "--allow-untrained", "--data", str(root), "--out", str(out),
              "--cache-dir", str(cache), "--no-plot"]

    error = cli_error(common)
    assert "test.jsonl row 1" in error and "broken.png" in error, error
    assert "--skip-bad" in error
    assert not (out / "summary.json").exists()

    assert main(common + ["--skip-bad"]) == 0
    assert "2 bad row(s) skipped" in capsys.readouterr().out
    subset = load_summary(out)["subsets"]["GQA"]
    assert subset["count"] == 2 and subset["skipped_rows"] == 2


def test_rerank_reports_the_matching_heads_separation_auc_per_subset(tiny_model, tmp_path):
    """On the built-in shapes world: ``rerank_auc`` is p(Yes) of each query's positive against
    the negatives in its top N (the positive scored wherever it ranked), pooled over the
    subset's queries with ties half; summary.md shows it per subset only when reranked."""
    from rematch.data.mmeb import iter_eval_examples
    from rematch.evaluation.mmeb import evaluate_mmeb_source
    from rematch.retrieval.rerank import matching_probabilities
    from rematch.world.tasks import write_shapes_dataset

    root = str(write_shapes_dataset(tmp_path / "shapes", train_rows=0, eval_queries=4, num_candidates=5,
                                    image_size=56))
    subsets, top_n = ["ShapesT2I", "ShapesCLS"], 2
    first = evaluate_mmeb_source(tiny_model, root, tmp_path / "first", subsets=subsets, plot=False, log=None)
    summary = evaluate_mmeb_source(tiny_model, root, tmp_path / "reranked", subsets=subsets, rerank=top_n,
                                   plot=False, log=None)
    for name in subsets:
        assert "rerank_auc" not in first["subsets"][name]
        positives, negatives = [], []
        for example in iter_eval_examples(root, name):  # each query alone, no dedupe
            query = tiny_model.encode([example.query], role="query")[0]
            documents = document_items(example.candidates, name, tiny_model.config)
            vectors = tiny_model.encode(documents, role="document")
            top = [int(i) for i in np.argsort(-(vectors @ query), kind="stable")[:top_n]]
            scored = top if 0 in top else top + [0]
            p_yes = dict(zip(scored, matching_probabilities(tiny_model, example.query, [documents[i] for i in scored],
                                                            query_embedding=query,
                                                            document_embeddings=vectors[scored])))
            positives.append(p_yes[0])
            negatives += [p_yes[i] for i in top if documents[i] != documents[0]]
        pairs = np.array(positives)[:, None] - np.array(negatives)[None, :]
        expected = float((pairs > 0).mean() + 0.5 * (pairs == 0).mean())
        assert summary["subsets"][name]["rerank_auc"] == pytest.approx(expected, abs=1e-6), name
        assert summary["subsets"][name]["rerank"] == top_n
        written = json.loads((tmp_path / "reranked" / f"{name}.json").read_text())
        assert written["rerank_auc"] == summary["subsets"][name]["rerank_auc"]
    table = (tmp_path / "reranked" / "summary.md").read_text().split("## Per subset", 1)[1]
    assert "| rerank AUC |" in table.splitlines()[2]
    for name in subsets:
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert row.rstrip(" |").rsplit("| ", 1)[1] == f"{summary['subsets'][name]['rerank_auc']:.3f}"
    assert "rerank AUC" not in (tmp_path / "first" / "summary.md").read_text()
