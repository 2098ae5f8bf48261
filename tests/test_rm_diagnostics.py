"""Length-bias and batch-invariance diagnostics against hand computations."""

import math

import pytest

from rlhfkit.eval.diagnostics import average_ranks, batch_invariance, length_bias, sample_rows, spearman


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))  # 0.8
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    # with ties: Pearson of average ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4]
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_length_bias_split():
    result = length_bias([2, 1, 0, 5], [1, 2, 1, 5], [10, 10, 3, 4], [5, 20, 8, 4])
    assert result["chosen_longer"] == {"pairs": 1, "accuracy": 1.0}
    assert result["chosen_shorter"] == {"pairs": 2, "accuracy": 0.0}
    assert result["same_length"] == {"pairs": 1, "accuracy": 0.0}  # a tie is wrong


def test_batch_invariance_and_sample():
    result = batch_invariance([1.0, 2.0, 3.0], [1.0, 2.5, 2.9], batch_size=8, rows=2)
    assert result["max_abs_diff"] == pytest.approx(0.5) and result["mean_abs_diff"] == pytest.approx(0.2)
    assert sample_rows(5, 10) == [0, 1, 2, 3, 4]
    assert sample_rows(100, 3, seed=0) == sample_rows(100, 3, seed=0) and len(sample_rows(100, 3)) == 3
