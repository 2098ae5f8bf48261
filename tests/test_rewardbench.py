"""RewardBench scoring against a hand computation: ties, several sections, a missing section, Prior."""

import pytest

from rlhfkit.rewardbench import rewardbench_summary, subset_accuracies


def test_sections_weighted_by_official_counts_with_missing_section_and_prior():
    # alpacaeval-easy: 3/4, mt-bench-easy: 1/2 (one tie, wrong), hep-python 1/1, math-prm 0/2, shp 1/2.
    subsets = (["alpacaeval-easy"] * 4 + ["mt-bench-easy"] * 2 + ["hep-python"] + ["math-prm"] * 2
               + ["shp"] * 2 + ["my-own-set"])
    chosen = [1, 1, 1, 0, 1, 0.5, 2, 0, 0, 1, 0, 3]
    rejected = [0, 0, 0, 1, 0, 0.5, 1, 1, 1, 0, 1, 0]
    correct = [c > r for c, r in zip(chosen, rejected)]
    per_subset = subset_accuracies(subsets, correct)
    assert per_subset["mt-bench-easy"]["accuracy"] == 0.5  # the tie counted wrong
    summary = rewardbench_summary(per_subset)
    chat = 100 * (0.75 * 100 + 0.5 * 28) / (100 + 28)
    reasoning = 100 * (1.0 * 164 + 0.0 * 984) / (164 + 984)
    assert summary["sections"]["Chat"] == pytest.approx(chat)
    assert summary["sections"]["Reasoning"] == pytest.approx(reasoning)
    assert summary["missing_sections"] == ["Chat Hard", "Safety"]
    assert summary["sections"]["Safety"] == 0.0
    assert summary["score"] == pytest.approx((chat + 0 + 0 + reasoning) / 4)  # RewardBench counts missing as 0
    assert summary["score_present_sections"] == pytest.approx((chat + reasoning) / 2)
    assert summary["prior"] == pytest.approx(50.0)
    assert summary["legacy_score"] == pytest.approx((2 * chat + 2 * reasoning + 1 * 50.0) / 9)
    assert summary["other_subsets"] == ["my-own-set"]


def test_legacy_without_prior_masks_it_out():
    per_subset = subset_accuracies(["alpacaeval-easy", "refusals-dangerous"], [True, False])
    summary = rewardbench_summary(per_subset)
    assert summary["prior"] is None
    assert summary["legacy_score"] == pytest.approx((2 * 100 + 2 * 0) / 8)
