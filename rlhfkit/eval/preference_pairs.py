"""Plain pairwise accuracy on any preference file `rlhfkit.data` reads (`--benchmark pairs`), and the pair summary
RewardBench v1 shares (`summarize_pairs`: v1 rows are pairs with RewardBench subsets).

A pair is correct iff score(chosen) > score(rejected) (strict, as RewardBench); accuracy per `subset`, else per
`source` when the file mixes several; rows whose subsets are RewardBench's get its sections too. Rows are loaded
by `rlhfkit.data.load_preferences`, so pairs with chosen == rejected are dropped there and counted.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhfkit.eval.rewardbench import (format_table, is_correct, is_rewardbench, rewardbench_summary,
                                      subset_accuracies)

NAME = "pairs"
TITLE = "preference pairs"
HEADLINE = "accuracy"
GROUP = False
MAX_LENGTH = 2048  # as RewardBench v1: scripts/run_rm.py
TRUNCATION_SIDE = "left"
TRUNCATION_RULE = "scripts/run_rm.py: tokenizer truncation, side 'left'"
DPO_MODE = True


def detect(records: list) -> bool:
    """Anything: the fallback when no benchmark layout matches (load_preferences says what is wrong with a row)."""
    return True


def load(paths: Sequence[str], split: str = "train", skip_invalid: bool = False):
    from rlhfkit.data import load_preferences

    return load_preferences(paths, skip_invalid=skip_invalid, split=split)


def summarize_pairs(rows: list[dict], scores: Sequence[float], truncated: Sequence[bool], totals: dict,
                    v1: bool) -> dict:
    """`summarize` (rlhfkit/eval/benchmarks.py) for pairs: scores are every chosen, then every rejected; `v1`: the
    rows are RewardBench's (every row scored, identical and empty ones counted)."""
    n = len(rows)
    chosen_scores, rejected_scores = list(scores[:n]), list(scores[n:])
    correct = [is_correct(c, r) for c, r in zip(chosen_scores, rejected_scores)]
    subsets = [row.get("subset") for row in rows]
    rewardbench = v1 or is_rewardbench(subsets)
    if not any(subsets):
        sources = {row.get("source") for row in rows}
        subsets = [row.get("source") for row in rows] if len(sources) > 1 else [None] * n
    per_subset = subset_accuracies(subsets, correct)
    summary = rewardbench_summary(per_subset) if rewardbench else None
    results = {
        "pairs": n,
        "accuracy": sum(correct) / n,
        "ties": sum(c == r for c, r in zip(chosen_scores, rejected_scores)),
        "identical_pairs": totals.get("identical_pairs", 0) if v1 else 0,
        "dropped_identical_pairs": totals.get("dropped_identical", 0),
        "empty_chosen": totals.get("empty_chosen", 0),
        "empty_rejected": totals.get("empty_rejected", 0),
        "per_subset": per_subset,
        "rewardbench": summary,
    }
    table = format_table(per_subset, summary)
    table += (f"\n\n{'Accuracy (all pairs)':<28}{100 * results['accuracy']:>16.2f}   ({n} pairs, "
              f"{results['ties']} ties)")
    if v1:
        table += (f"\n{'Rows scored':<28}{n:>16}   (every row: {results['identical_pairs']} identical "
                  f"chosen == rejected, {results['empty_chosen']} empty chosen, {results['empty_rejected']} "
                  "empty rejected)")
    elif results["dropped_identical_pairs"]:
        table += f"\n{'Dropped (chosen == rejected)':<28}{results['dropped_identical_pairs']:>16}"
    lines = [{"id": row.get("id", str(i)), "subset": row.get("subset"), "source": row.get("source"),
              "chosen_score": c, "rejected_score": r, "correct": ok, "truncated": bool(truncated[i] or truncated[n + i])}
             for i, (row, c, r, ok) in enumerate(zip(rows, chosen_scores, rejected_scores, correct))]
    metrics = {"accuracy": results["accuracy"], "pairs": n}
    if summary:
        metrics.update({"score": summary["score"], "legacy_score": summary["legacy_score"], **summary["sections"]})
    pairs = [(i, n + i, row.get("source") or row.get("subset") or "all") for i, row in enumerate(rows)]
    return {"results": results, "table": table, "metrics": metrics, "lines": lines, "pairs": pairs}


def summarize(rows: list[dict], scores: Sequence[float], truncated: Sequence[bool], totals: dict) -> dict:
    return summarize_pairs(rows, scores, truncated, totals, v1=False)


def headline_of(results: dict) -> float:
    return 100 * results["accuracy"]


