"""Reward-model diagnostics reported by every `eval_benchmark.py` run (not part of RewardBench; extra).

- Length bias: Spearman's ρ between each response's reward and its length in tokens (the response text tokenized by
  the reward model's tokenizer without special tokens), over every scored response; and the strict pairwise accuracy
  split by whether the chosen response is the longer or the shorter one (a length-biased RM is right when chosen is
  longer and wrong when it is shorter).
- Batch invariance: the scores of a seeded sample of rows scored again one sequence per batch, against the scores of
  the run (batched at `--batch_size`); max and mean absolute difference. Padding, sorting by length and fused kernels
  should change a score only at float rounding; a large value means the padding is read (RewardBench issues
  #137, #154 are about this).
Pure functions of lists of numbers; no SciPy needed (Spearman = Pearson on average ranks, ties averaged).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (scipy.stats.rankdata 'average')."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start + 1
        while stop < len(values) and sorted_values[stop] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop]] = (start + 1 + stop) / 2.0  # mean of ranks start+1 .. stop
        start = stop
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation; NaN with fewer than 2 points or when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} vs {len(y)} values")
    if len(x) < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else math.nan


def length_bias(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths) -> dict:
    """Strict accuracy on pairs where chosen is longer / shorter / as long as rejected (tokens)."""
    groups = {"chosen_longer": [], "chosen_shorter": [], "same_length": []}
    for c, r, lc, lr in zip(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths):
        key = "chosen_longer" if lc > lr else "chosen_shorter" if lc < lr else "same_length"
        groups[key].append(c > r)
    return {key: {"pairs": len(hits), "accuracy": (sum(hits) / len(hits)) if hits else None}
            for key, hits in groups.items()}


def sample_rows(n_rows: int, k: int, seed: int = 0) -> list[int]:
    """A seeded sample of k row indices (all rows when k ≥ n), sorted."""
    if k <= 0 or n_rows == 0:
        return []
    if k >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), k))


def batch_invariance(batched_scores: Sequence[float], single_scores: Sequence[float], batch_size: int,
                     rows: int) -> dict:
    """Max / mean |score at batch_size − score at batch size 1| over the re-scored sequences."""
    diffs = np.abs(np.asarray(batched_scores, dtype=np.float64) - np.asarray(single_scores, dtype=np.float64))
    return {"rows": rows, "sequences": int(len(diffs)), "batch_size": batch_size,
            "max_abs_diff": float(diffs.max()) if len(diffs) else None,
            "mean_abs_diff": float(diffs.mean()) if len(diffs) else None}


def length_report(scores: Sequence[float], lengths: Sequence[int], chosen_scores=None, rejected_scores=None,
                  chosen_lengths=None, rejected_lengths=None) -> dict:
    report = {"responses": len(scores), "spearman_reward_length": spearman(scores, lengths),
              "mean_length_tokens": float(np.mean(lengths)) if len(lengths) else None}
    if chosen_scores is not None:
        report["pairs"] = length_bias(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths)
    return report


def format_lines(diagnostics: dict) -> list[str]:
    """Table lines for the length and batch-invariance diagnostics."""
    lines = []
    length = diagnostics.get("length")
    if length:
        rho = length["spearman_reward_length"]
        lines.append(f"{'Spearman(reward, length)':<28}{rho:>16.4f}   ({length['responses']} responses, "
                     f"mean {length['mean_length_tokens']:.1f} tokens)" if not math.isnan(rho) else
                     f"{'Spearman(reward, length)':<28}{'n/a':>16}   ({length['responses']} responses)")
        for key, label in (("chosen_longer", "Accuracy, chosen longer"), ("chosen_shorter", "Accuracy, chosen shorter"),
                           ("same_length", "Accuracy, same length")):
            group = length.get("pairs", {}).get(key)
            if group and group["pairs"]:
                lines.append(f"{label:<28}{100 * group['accuracy']:>16.2f}   ({group['pairs']} pairs)")
    invariance = diagnostics.get("batch_invariance")
    if invariance and invariance["sequences"]:
        lines.append(f"{'Batch invariance max |Δ|':<28}{invariance['max_abs_diff']:>16.3g}   "
                     f"({invariance['rows']} rows, {invariance['sequences']} sequences: batch 1 vs "
                     f"{invariance['batch_size']})")
    return lines
