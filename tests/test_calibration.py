"""rlhfkit/calibration.py: ECE against a hand computation, binning edges, calibrated vs over-confident scores,
per-source accuracy, the reliability diagram, and bad input."""

import json
import math
import os

import numpy as np
import pytest

from rlhfkit.eval.calibration import (
    DIAGRAM_FILE,
    calibration_report,
    expected_calibration_error,
    pair_probabilities,
    reliability_bins,
    symmetric_predictions,
)
from rlhfkit.errors import UserError


def _logit(p):
    return math.log(p / (1 - p))


# Four pairs with σ(r_c − r_r) = 0.95, 0.95, 0.65, 0.25 (the last one wrong). Both orders give 8 predictions:
#   p:       0.95 0.95 0.65 0.25 | 0.05 0.05 0.35 0.75
#   outcome: 1    1    1    1    | 0    0    0    0
# bins (width 0.1): 9 holds {0.95, 0.95} all 1 → |1 − 0.95| = 0.05, weight 2/8; 6: {0.65}→1: 0.35; 2: {0.25}→1: 0.75;
#   0: {0.05, 0.05} all 0 → 0.05, weight 2/8; 3: {0.35}→0: 0.35; 7: {0.75}→0: 0.75.
# ECE = (2·0.05 + 0.35 + 0.75 + 2·0.05 + 0.35 + 0.75) / 8 = 2.4 / 8 = 0.3
FIXTURE_P = [0.95, 0.95, 0.65, 0.25]
FIXTURE_SOURCES = ["helpful", "helpful", "harmless", "harmless"]


def test_ece_matches_hand_computation(tmp_path):
    chosen = [_logit(p) + 1.0 for p in FIXTURE_P]  # a shared offset: only the difference matters
    rejected = [1.0] * 4
    report = calibration_report(chosen, rejected, FIXTURE_SOURCES, tmp_path)
    assert report["n_bins"] == 10
    assert report["overall"]["ece"] == pytest.approx(0.3)
    assert report["overall"]["accuracy"] == pytest.approx(0.75)
    # helpful: predictions {0.95, 0.95 → 1; 0.05, 0.05 → 0}: ECE 0.05; harmless: four single-member bins, 0.55
    assert report["per_source"]["helpful"] == pytest.approx(
        {"pairs": 2, "accuracy": 1.0, "ece": 0.05, "mean_confidence": 0.95})
    assert report["per_source"]["harmless"]["accuracy"] == 0.5
    assert report["per_source"]["harmless"]["ece"] == pytest.approx((0.35 + 0.75 + 0.35 + 0.75) / 4)
    bins = report["overall"]["bins"]
    assert [b["count"] for b in bins] == [2, 0, 1, 1, 0, 0, 1, 1, 0, 2]
    assert bins[9]["confidence"] == pytest.approx(0.95) and bins[9]["accuracy"] == 1.0
    assert bins[1]["confidence"] is None and bins[1]["accuracy"] is None
    json.dumps(report, allow_nan=False)  # standard JSON for results.json


def test_bin_edges_and_extremes():
    # p = 0.1 exactly starts bin 1; p = 1.0 belongs to the last bin; huge score gaps do not overflow
    bins = reliability_bins(np.array([0.0, 0.1, 0.5, 1.0]), np.array([0, 1, 1, 1]), n_bins=10)
    assert [b["count"] for b in bins] == [1, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    p = pair_probabilities([1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0])
    assert p.tolist() == [1.0, 0.0, 0.5]
    probabilities, outcomes = symmetric_predictions([2.0], [0.0])
    assert probabilities.tolist() == pytest.approx([1 / (1 + math.exp(-2)), 1 - 1 / (1 + math.exp(-2))])
    assert outcomes.tolist() == [1.0, 0.0]
    assert math.isnan(expected_calibration_error(np.array([]), np.array([])))


def test_ties_are_wrong_but_perfectly_calibrated():
    report = calibration_report([0.3, 0.3], [0.3, 0.3], [None, ""], None, plot=False)
    assert report["overall"]["accuracy"] == 0.0  # strict >, as RewardBench
    assert report["overall"]["ece"] == 0.0  # p = 0.5 with outcomes 1 and 0: no gap
    assert list(report["per_source"]) == ["all"]
    assert report["reliability_diagram"] is None


def test_calibrated_scores_have_low_ece_and_overconfident_ones_high():
    rng = np.random.default_rng(0)
    gaps = rng.normal(0.0, 2.0, 20000)
    first_preferred = rng.random(20000) < 1 / (1 + np.exp(-gaps))  # labels drawn from the model's own belief
    chosen = np.where(first_preferred, gaps, 0.0)
    rejected = np.where(first_preferred, 0.0, gaps)
    calibrated = calibration_report(chosen, rejected, ["s"] * 20000, None, plot=False)["overall"]["ece"]
    overconfident = calibration_report(5 * chosen, 5 * rejected, ["s"] * 20000, None, plot=False)["overall"]["ece"]
    assert calibrated < 0.02
    assert overconfident > 0.15


def test_reliability_diagram_is_written_atomically(tmp_path):
    rng = np.random.default_rng(1)
    n = 300
    sources = rng.choice(["a", "b", "c"], n).tolist()
    report = calibration_report(rng.normal(1, 2, n), rng.normal(0, 1, n), sources, tmp_path / "eval")
    path = tmp_path / "eval" / DIAGRAM_FILE
    assert report["reliability_diagram"] == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert sorted(os.listdir(tmp_path / "eval")) == [DIAGRAM_FILE]  # no temp file left behind
    assert set(report["per_source"]) == {"a", "b", "c"}
    assert sum(s["pairs"] for s in report["per_source"].values()) == n


def test_bad_input():
    with pytest.raises(ValueError, match="must match"):
        calibration_report([1.0, 2.0], [0.0], ["a", "b"], None)
    with pytest.raises(UserError, match="non-finite scores for 1 of 2 pairs"):
        calibration_report([1.0, float("nan")], [0.0, 0.0], ["a", "b"], None)
