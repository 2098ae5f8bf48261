"""Calibration of a reward model's pairwise preferences: per-source accuracy, expected calibration error (ECE) of
σ(r_chosen − r_rejected), and a reliability diagram.

A Bradley-Terry reward model claims P(chosen ≻ rejected) = σ(r_c − r_r). Every labelled pair therefore gives two
predictions with known outcomes: p = σ(r_c − r_r) for "chosen wins" (outcome 1) and 1 − p for "rejected wins"
(outcome 0). We score both, as the MORE paper does (Zeng et al. 2023, arXiv:2312.07401; reference code
github.com/dunzeng/MORE evaluates all ordered pairs); with only the first, every outcome would be 1 and ECE would
just measure under-confidence. The diagram is then symmetric about (0.5, 0.5).

ECE with B equal-width bins over [0, 1] (bin b = [b/B, (b+1)/B), the last one closed):
    ECE = Σ_b (n_b / N) · |mean outcome in b − mean p in b|       (N = 2 × pairs)
Accuracy is strict, as in RewardBench: a tie (r_c = r_r) counts as wrong.

Written by hand (a dozen lines of numpy); `calibration_report` is what `eval_benchmark.py` calls.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rlhfkit.errors import UserError

DIAGRAM_FILE = "reliability.png"
_MAX_PLOTTED_SOURCES = 8  # more lines than this make the diagram unreadable; the JSON keeps every source


def pair_probabilities(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> np.ndarray:
    """σ(r_c − r_r) per pair, [N] float64, computed without overflow for large score gaps."""
    diff = np.asarray(chosen_scores, dtype=np.float64) - np.asarray(rejected_scores, dtype=np.float64)
    out = np.empty_like(diff)
    positive = diff >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-diff[positive]))
    exp_diff = np.exp(diff[~positive])
    out[~positive] = exp_diff / (1.0 + exp_diff)
    return out


def symmetric_predictions(chosen_scores, rejected_scores) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [2N], outcomes [2N]): p with outcome 1 for every pair, then 1 − p with outcome 0."""
    p = pair_probabilities(chosen_scores, rejected_scores)
    return np.concatenate([p, 1.0 - p]), np.concatenate([np.ones_like(p), np.zeros_like(p)])


def reliability_bins(probabilities: np.ndarray, outcomes: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Per equal-width bin: lower, upper, count, confidence (mean p) and accuracy (mean outcome); None when empty."""
    if n_bins < 1:
        raise ValueError("n_bins must be ≥ 1")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    outcomes = np.asarray(outcomes, dtype=np.float64)
    index = np.minimum((probabilities * n_bins).astype(np.int64), n_bins - 1)
    bins = []
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        bins.append({
            "lower": b / n_bins,
            "upper": (b + 1) / n_bins,
            "count": count,
            "confidence": float(probabilities[members].mean()) if count else None,
            "accuracy": float(outcomes[members].mean()) if count else None,
        })
    return bins


def expected_calibration_error(probabilities: np.ndarray, outcomes: np.ndarray, n_bins: int = 10) -> float:
    """Σ_b (n_b / N)·|accuracy_b − confidence_b| over equal-width bins. NaN for no predictions."""
    total = len(probabilities)
    if total == 0:
        return math.nan
    return float(sum(
        b["count"] / total * abs(b["accuracy"] - b["confidence"])
        for b in reliability_bins(probabilities, outcomes, n_bins) if b["count"]
    ))


def pairwise_calibration(chosen_scores, rejected_scores, n_bins: int = 10) -> dict:
    """pairs, accuracy (strict), ECE, mean confidence of the predicted winner, and the bins, for one set of pairs."""
    chosen = np.asarray(chosen_scores, dtype=np.float64)
    rejected = np.asarray(rejected_scores, dtype=np.float64)
    probabilities, outcomes = symmetric_predictions(chosen, rejected)
    p = probabilities[: len(chosen)]
    return {
        "pairs": int(len(chosen)),
        "accuracy": float(np.mean(chosen > rejected)) if len(chosen) else math.nan,
        "ece": expected_calibration_error(probabilities, outcomes, n_bins),
        "mean_confidence": float(np.mean(np.maximum(p, 1.0 - p))) if len(chosen) else math.nan,
        "bins": reliability_bins(probabilities, outcomes, n_bins),
    }


def calibration_report(chosen_scores: Sequence[float], rejected_scores: Sequence[float], sources: Sequence[str],
                       out_dir: str | os.PathLike | None, n_bins: int = 10, plot: bool = True) -> dict:
    """Calibration of all pairs and of each source; writes `out_dir/reliability.png` (atomically) when `plot`.

    chosen_scores, rejected_scores, sources: one entry per pair (a missing source counts as "all").
    Returns a JSON-serialisable dict: n_bins, method, overall {pairs, accuracy, ece, mean_confidence, bins},
    per_source {name: {pairs, accuracy, ece, mean_confidence}}, reliability_diagram (path or None).
    """
    if not len(chosen_scores) == len(rejected_scores) == len(sources):
        raise ValueError(f"calibration_report: {len(chosen_scores)} chosen scores, {len(rejected_scores)} rejected "
                         f"scores and {len(sources)} sources; they must match")
    chosen = np.asarray(chosen_scores, dtype=np.float64)
    rejected = np.asarray(rejected_scores, dtype=np.float64)
    bad = ~(np.isfinite(chosen) & np.isfinite(rejected))
    if bad.any():
        raise UserError(f"the reward model gave non-finite scores for {int(bad.sum())} of {len(chosen)} pairs "
                        f"(first: pair {int(np.argmax(bad))}); the checkpoint is probably broken")
    names = np.asarray([str(s) if s not in (None, "") else "all" for s in sources], dtype=object)
    overall = pairwise_calibration(chosen, rejected, n_bins)
    per_source = {}
    for name in sorted(set(names.tolist())):
        members = names == name
        stats = pairwise_calibration(chosen[members], rejected[members], n_bins)
        per_source[name] = stats
    report = {
        "n_bins": n_bins,
        "method": "ECE of sigma(r_chosen - r_rejected) with both orders of every pair, equal-width bins",
        "overall": overall,
        "per_source": {name: {k: v for k, v in stats.items() if k != "bins"} for name, stats in per_source.items()},
        "reliability_diagram": None,
    }
    if plot and out_dir is not None and len(chosen):
        path = Path(out_dir) / DIAGRAM_FILE
        write_reliability_diagram(path, overall, per_source)
        report["reliability_diagram"] = str(path)
    return report


def write_reliability_diagram(path: str | os.PathLike, overall: dict, per_source: dict[str, dict]) -> Path:
    """Accuracy against confidence per bin (all pairs as bars, the largest sources as lines), counts below.

    Uses the Agg canvas directly, so the caller's matplotlib backend is left alone. Written to a temp file in the
    same directory and renamed into place.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bins = overall["bins"]
    width = bins[0]["upper"] - bins[0]["lower"]
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]

    figure = Figure(figsize=(6.4, 7.2))
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    filled = [(c, b) for c, b in zip(centres, bins) if b["count"]]
    top.bar([c for c, _ in filled], [b["accuracy"] for _, b in filled], width=width * 0.9, color="#4c72b0",
            alpha=0.55, edgecolor="#4c72b0", label=f"all pairs (ECE {overall['ece']:.3f})")
    for c, b in filled:  # the gap between confidence and accuracy is what ECE sums
        top.plot([c, c], [b["accuracy"], b["confidence"]], color="#c44e52", linewidth=2, alpha=0.8)
    largest = sorted(per_source.items(), key=lambda item: -item[1]["pairs"])[:_MAX_PLOTTED_SOURCES]
    if len(per_source) > 1:
        for name, stats in largest:
            points = [(b["confidence"], b["accuracy"]) for b in stats["bins"] if b["count"]]
            top.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3, linewidth=1,
                     label=f"{name} (ECE {stats['ece']:.3f}, acc {stats['accuracy']:.2f})")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("fraction correct (outcome)")
    hidden = len(per_source) - len(largest) if len(per_source) > 1 else 0
    title = f"Reliability of σ(r_chosen − r_rejected), {overall['pairs']} pairs, both orders"
    top.set_title(title + (f"\n({hidden} smaller sources not drawn)" if hidden > 0 else ""), fontsize=10)
    top.legend(fontsize=7, loc="upper left")
    bottom.bar(centres, [b["count"] for b in bins], width=width * 0.9, color="#55a868")
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("predictions")
    figure.tight_layout()

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
