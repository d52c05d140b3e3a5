"""Reranking with the matching head."""

from __future__ import annotations

import numpy as np
import pytest

from rematch.world.scenes import Scene, ShapeObject, render
from rematch.retrieval.rerank import matching_probabilities, rerank, rerank_query, reranked_scores


def candidates():
    images = [render(Scene((ShapeObject(colour, "circle", "large", 0.5, 0.5),)), side=56)
              for colour in ("red", "blue", "green")]
    return [{"image": image} for image in images] + [{"text": "a large red circle"}, {"text": "a small blue star"}]


def test_rerank_is_a_permutation_of_the_top_n(tiny_model):
    items = candidates()
    order = rerank(tiny_model, "a large red circle", items, top_n=4)
    assert sorted(order) == [0, 1, 2, 3]
    scores = matching_probabilities(tiny_model, "a large red circle", items[:4])
    assert ((scores > 0) & (scores < 1)).all()
    assert order == list(np.argsort(-scores, kind="stable"))


def test_a_candidates_score_does_not_depend_on_its_neighbours(tiny_model):
    items = candidates()
    together = matching_probabilities(tiny_model, "a large red circle", items, batch_size=5)
    alone = [matching_probabilities(tiny_model, "a large red circle", [item])[0] for item in items]
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_raw_view_only_scores_differ_from_all_views(tiny_model):
    items = candidates()[:3]
    all_views = matching_probabilities(tiny_model, "a large red circle", items)
    raw = matching_probabilities(tiny_model, "a large red circle", items, views="raw")
    assert not np.allclose(all_views, raw)
    with pytest.raises(ValueError, match="views"):
        matching_probabilities(tiny_model, "q", items, views="some")


def test_reranked_scores_lift_the_top_n_and_keep_the_rest(tiny_model):
    items = candidates()
    first = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    result = reranked_scores(tiny_model, "a large red circle", items, first, top_n=3)
    top = {0, 2, 3}
    assert min(result[i] for i in top) > max(result[i] for i in set(range(5)) - top)
    np.testing.assert_array_equal(result[[1, 4]], first[[1, 4]])


def test_rerank_query_keeps_the_heads_probabilities_and_scores_a_candidate_outside_the_top_n(tiny_model):
    """The p(Yes) behind a rerank, plus a candidate asked for outside the top N, which changes
    neither the reranked scores nor its own first-stage score."""
    items = candidates()
    first = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    result = rerank_query(tiny_model, "a large red circle", items, first, top_n=3, also_score=(1, 0))
    np.testing.assert_array_equal(result.scores, reranked_scores(tiny_model, "a large red circle", items, first, 3))
    assert result.top == [0, 3, 2] and set(result.probabilities) == {0, 1, 2, 3}
    expected = matching_probabilities(tiny_model, "a large red circle", [items[i] for i in (0, 1, 2, 3)])
    np.testing.assert_allclose([result.probabilities[i] for i in (0, 1, 2, 3)], expected, atol=1e-5)
    assert result.scores[1] == first[1]


def test_mmeb_evaluation_with_rerank_reports_both_stages(tiny_model):
    from rematch.data.items import Item
    from rematch.data.records import EvalExample, RowRef
    from rematch.evaluation.mmeb import evaluate_mmeb

    items = [Item(image=c["image"]) if "image" in c else Item(text=c["text"]) for c in candidates()]
    examples = [EvalExample(Item(text=text), tuple(items[i:] + items[:i]), "ShapesT2I", RowRef("t.jsonl", i))
                for i, text in enumerate(["a large red circle", "a large blue circle", "a large green circle"])]
    first = evaluate_mmeb(tiny_model, {"ShapesT2I": examples}, None, log=None, plot=False)
    second = evaluate_mmeb(tiny_model, {"ShapesT2I": examples}, None, rerank=3, log=None, plot=False)
    first_subset, second_subset = first["subsets"]["ShapesT2I"], second["subsets"]["ShapesT2I"]
    assert first_subset["rerank"] == 0 and second_subset["rerank"] == 3
    assert first_subset["count"] == second_subset["count"] == 3
    for key in ("hit@1", "hit@5", "mrr"):
        assert 0.0 <= second_subset[key] <= 1.0
    assert "rerank_auc" not in first_subset and 0.0 <= second_subset["rerank_auc"] <= 1.0
