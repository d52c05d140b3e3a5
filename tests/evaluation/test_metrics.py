"""Ranking metrics against hand-computed values, under both tie rules (pessimistic and list order)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rematch.evaluation.metrics import (
    compute_metrics,
    hit_at_k,
    ndcg_at_k,
    ranks_of_relevant,
    recall_at_k,
    reciprocal_rank,
    relevant_ranks,
)

INF = math.inf


def test_single_positive_ranked_second():
    # candidate 2 (0.95) beats the positive (0.9): rank 2
    ranks = relevant_ranks([[0.9, 0.5, 0.95, 0.1]], [[1, 0, 0, 0]])
    assert ranks.ranks.tolist() == [[2]]
    assert hit_at_k(ranks, 1).tolist() == [0.0]
    assert hit_at_k(ranks, 5).tolist() == [1.0]
    assert reciprocal_rank(ranks).tolist() == [0.5]
    assert recall_at_k(ranks, 1).tolist() == [0.0]
    assert ndcg_at_k(ranks, 10)[0] == pytest.approx(1 / math.log2(3))


def test_a_tie_with_the_positive_is_not_a_hit():
    # the positive ties with a wrong candidate: it is ranked behind it, whichever comes first
    assert relevant_ranks([[0.5, 0.5, 0.1]], [[1, 0, 0]]).ranks.tolist() == [[2]]
    assert relevant_ranks([[0.5, 0.5, 0.1]], [[0, 1, 0]]).ranks.tolist() == [[2]]
    # a collapsed model (all scores equal) ranks the positive last: hit@1 = 0, MRR = 1/4
    collapsed = relevant_ranks([[0.3, 0.3, 0.3, 0.3]], [[1, 0, 0, 0]])
    assert collapsed.ranks.tolist() == [[4]]
    assert hit_at_k(collapsed, 1).tolist() == [0.0]
    assert reciprocal_rank(collapsed).tolist() == [0.25]


def test_several_relevant_hand_computed():
    # order: idx1 (0.9), idx2 (0.8), idx3 (0.7), idx4 (0.6), idx0 (0.1); relevant idx 0, 2, 4 -> ranks 5, 2, 4
    scores = [[0.1, 0.9, 0.8, 0.7, 0.6]]
    relevance = [[1, 0, 1, 0, 1]]
    ranks = relevant_ranks(scores, relevance)
    assert sorted(ranks.ranks[0].tolist()) == [2, 4, 5]
    metrics = compute_metrics(scores, relevance, hit_ks=(1, 2), recall_ks=(1, 2, 4, 5), ndcg_ks=(3, 5))
    assert metrics["hit@1"] == 0.0 and metrics["hit@2"] == 1.0
    assert metrics["recall@1"] == 0.0
    assert metrics["recall@2"] == pytest.approx(1 / 3)
    assert metrics["recall@4"] == pytest.approx(2 / 3)
    assert metrics["recall@5"] == 1.0
    assert metrics["mrr"] == 0.5
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # 2.1309
    assert metrics["ndcg@3"] == pytest.approx((1 / math.log2(3)) / ideal)  # 0.2961
    assert metrics["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5) + 1 / math.log2(6)) / ideal)
    assert metrics["ndcg@5"] == pytest.approx(0.67973, abs=1e-5)


def test_graded_ndcg_uses_linear_gains():
    # grades 1 and 2 at ranks 1 and 3: DCG = 1/1 + 2/log2(4) = 2; ideal = 2/1 + 1/log2(3)
    ranks = relevant_ranks([[0.9, 0.8, 0.7]], [[1, 0, 2]])
    assert ndcg_at_k(ranks, 3)[0] == pytest.approx(2 / (2 + 1 / math.log2(3)))
    assert ndcg_at_k(ranks, 3)[0] == pytest.approx(0.76018, abs=1e-5)


def test_ties_between_graded_candidates_put_the_lower_grade_first():
    # equal scores, grades 2 and 1: the grade-1 candidate takes rank 1 (pessimistic for nDCG)
    ranks = relevant_ranks([[0.5, 0.5]], [[2, 1]])
    assert ranks.ranks[0].tolist() == [2, 1]  # relevant candidates listed in index order
    assert ndcg_at_k(ranks, 2)[0] == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))


def test_rows_are_independent_and_vectorised():
    scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.9, 0.2], [0.2, 0.2, 0.2]])
    relevance = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0]])
    ranks = relevant_ranks(scores, relevance)
    assert ranks.ranks[:, 0].tolist() == [1, 3, 3]
    metrics = compute_metrics(scores, relevance, hit_ks=(1,), recall_ks=(), ndcg_ks=())
    assert metrics == {"hit@1": pytest.approx(1 / 3), "mrr": pytest.approx((1 + 1 / 3 + 1 / 3) / 3)}


def test_ragged_lists_padded_with_minus_inf():
    scores = np.array([[0.3, 0.2, -INF, -INF], [0.1, 0.4, 0.2, 0.0]])
    ranks = ranks_of_relevant(scores, np.zeros((2, 1), dtype=np.int64))
    assert ranks.ranks[:, 0].tolist() == [1, 3]


def test_ranks_match_a_plain_sort_under_heavy_ties():
    """Cross-check the counting formula against sorting by (-score, grade, index)."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        scores = rng.integers(0, 3, size=(4, 9)).astype(float)  # many ties
        grades = rng.integers(0, 3, size=(4, 9)).astype(float)
        grades[:, 0] = np.maximum(grades[:, 0], 1)  # at least one relevant per row
        ranks = relevant_ranks(scores, grades)
        for row in range(4):
            order = sorted(range(9), key=lambda i: (-scores[row, i], grades[row, i], i))
            expected = sorted(order.index(i) + 1 for i in range(9) if grades[row, i] > 0)
            assert sorted(r for r in ranks.ranks[row].tolist() if r) == expected


def test_non_finite_scores_and_unjudged_queries_are_errors():
    with pytest.raises(FloatingPointError, match="row 1"):
        relevant_ranks([[0.1, 0.2], [np.nan, 0.3]], [[1, 0], [1, 0]])
    with pytest.raises(FloatingPointError):
        ranks_of_relevant(np.array([[INF, 0.2]]), np.array([[1]]))
    with pytest.raises(ValueError, match=r"queries \[1\] have no relevant"):
        relevant_ranks([[0.1, 0.2], [0.3, 0.4]], [[1, 0], [0, 0]])


def test_list_order_ties_credit_the_earlier_candidate():
    # the official MMEB rule: among equal scores the lower index ranks first, whatever the grades
    assert relevant_ranks([[0.5, 0.5, 0.1]], [[1, 0, 0]], ties="list_order").ranks.tolist() == [[1]]
    assert relevant_ranks([[0.5, 0.5, 0.1]], [[0, 1, 0]], ties="list_order").ranks.tolist() == [[2]]
    # which is why the strict rule is reported beside it: a collapsed model scores 100% hit@1 here
    collapsed = ranks_of_relevant(np.full((1, 4), 0.3), np.zeros((1, 1), dtype=np.int64), ties="list_order")
    assert hit_at_k(collapsed, 1).tolist() == [1.0] and reciprocal_rank(collapsed).tolist() == [1.0]
    # a strictly higher candidate still beats the answer under either rule
    beaten = ranks_of_relevant(np.array([[0.3, 0.3, 0.4]]), np.zeros((1, 1), dtype=np.int64), ties="list_order")
    assert beaten.ranks.tolist() == [[2]]


def test_list_order_is_numpy_argmax_and_a_stable_sort():
    """hit@1 under list_order is exactly `argmax == 0`; ranks are positions in a stable descending sort."""
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, size=(200, 7)).astype(float)  # many ties, often with candidate 0
    scores[:20, 3:] = -INF  # ragged lists
    answer = np.zeros((200, 1), dtype=np.int64)
    official = ranks_of_relevant(scores, answer, ties="list_order")
    strict = ranks_of_relevant(scores, answer)
    np.testing.assert_array_equal(hit_at_k(official, 1), (np.argmax(scores, axis=1) == 0).astype(float))
    stable_position = np.array([int(np.flatnonzero(np.argsort(-row, kind="stable") == 0)[0]) + 1 for row in scores])
    np.testing.assert_array_equal(official.ranks[:, 0], stable_position)
    # the two rules differ exactly on the rows where another candidate ties with the answer at the top
    tied_at_top = np.array([row[0] == row.max() and (row[1:] == row[0]).any() for row in scores])
    differ = (official.ranks[:, 0] == 1) & (strict.ranks[:, 0] > 1)
    np.testing.assert_array_equal(differ, tied_at_top)
    assert tied_at_top.sum() > 20  # the check is not vacuous


def test_unknown_tie_rule_is_an_error():
    with pytest.raises(ValueError, match="ties must be one of"):
        relevant_ranks([[0.1, 0.2]], [[1, 0]], ties="optimistic")
