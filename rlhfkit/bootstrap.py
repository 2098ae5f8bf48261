"""Prompt-level bootstrap statistics (pure): a mean with a percentile-bootstrap interval, per-prompt means, paired
differences; the unit is the prompt, because the responses to one prompt are not independent.

In the core because two families use it: the demo report (`rlhfkit/eval/report.py`, through
`rlhfkit.eval.bootstrap`) and the RL stage's held-out evaluation (`ppo_train.py --eval_dataset_path`), and
families never import each other."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n}

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0 or math.isnan(self.mean):
            return "n/a"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap_mean_ci(values, confidence: float = 0.95, n_resamples: int = 10000, seed: int = 0) -> Interval:
    """Mean of `values` with a percentile-bootstrap interval (resampling the values with replacement).

    values: 1-D, length n ≥ 1. n == 1 gives a zero-width interval (nothing to resample).
    """
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(data.mean())
    if data.size == 1:
        return Interval(mean, mean, mean, 1)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    # chunks keep the index matrix small for large n
    chunk = max(1, 2_000_000 // data.size)
    for begin in range(0, n_resamples, chunk):
        count = min(chunk, n_resamples - begin)
        means[begin : begin + count] = data[rng.integers(0, data.size, size=(count, data.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Interval(mean, float(low), float(high), int(data.size))


def per_prompt_means(ids: list[str], scores: list[list[float]]) -> "OrderedDict[str, float]":
    """id → mean of that prompt's response scores (the bootstrap's unit)."""
    out: OrderedDict[str, float] = OrderedDict()
    for row_id, row_scores in zip(ids, scores):
        if row_scores:
            out[row_id] = float(np.mean(row_scores))
    return out


def paired_differences(policy: dict[str, float], baseline: dict[str, float]) -> list[float]:
    """policy[id] − baseline[id] over the ids both have, in the baseline's order."""
    return [policy[key] - baseline[key] for key in baseline if key in policy]
