"""eval_benchmark.py's scorer for a pairwise preference model (pm_train.py output; rlhfkit/preference_model.py).

A PM has no score per response, only P(a ≻ b) for a comparison, so the rules are those of RewardBench's generative
judges, with P from both orders (RLHFlow's useful_code/eval_reward_bench_pm.py @ 3c8fca00):
- v1 and plain pairs: each row is one comparison, chosen vs rejected, P(chosen ≻ rejected) = the mean of both
  orders; credit 1 if P > 0.5, 0 if P < 0.5 and 0.5 at exactly 0.5 (RLHFlow's `correct = 0.5 if avg == 0.5`, and
  RewardBench's scripts/run_generative.py @ 2560a78c returns 0.5 for a tie/unparsed judgement). Sections, the
  4-section score and the legacy score as for a reward model (rlhfkit/eval/rewardbench.py), on those credits.
- v2 (best-of-N): the first (correct) completion is compared, both orders each, with every incorrect completion of
  its row; it takes the row if it loses none, with credit 1/k where k − 1 comparisons were exact ties (the same 1/k
  tie credit RewardBench 2 gives a reward model, `best_of_n_result`, and its generative ratings path,
  `(0 in winners) / len(winners)` in scripts/run_generative_v2.py @ 3e0242b6). RewardBench's own generative judge
  asks one 4-way question instead (a PM answers only A/B); ours is the pairwise reading of "the chosen is the best".
  The Ties subset needs an absolute score per completion (RewardBench 2 rates them); a PM has none, so Ties rows
  are not scored: the subset is reported as missing and the score over the present subsets is given beside it.
Everything else the RM path reports (length diagnostics, ECE) needs per-response scores and is not computed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path


logger = logging.getLogger(__name__)


def pair_credits(probabilities: list[float]) -> list[float]:
    """Credit per comparison: 1 / 0.5 / 0 (rlhfkit.preference_model.outcome)."""
    from rlhfkit.preference_model import outcome

    return [outcome(p) for p in probabilities]


def best_of_n_credit(probabilities: list[float]) -> float:
    """The first completion against each incorrect one: 0 if it loses any, else 1/(1 + exact ties)."""
    from rlhfkit.preference_model import outcome

    results = [outcome(p) for p in probabilities]
    if any(r == 0.0 for r in results):
        return 0.0
    return 1.0 / (1 + sum(r == 0.5 for r in results))


def credit_accuracies(subsets: list[str | None], credits: list[float]) -> dict[str, dict]:
    """subset → {correct (sum of credits), n, accuracy}: rewardbench.subset_accuracies with half credits."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for subset, credit in zip(subsets, credits):
        key = subset if subset is not None else "all"
        sums[key][0] += credit
        sums[key][1] += 1
    return {key: {"correct": c, "n": n, "accuracy": c / n} for key, (c, n) in sorted(sums.items())}


def evaluate(script_args, benchmark: str, rows: list[dict], data_report: dict, model_path: str, model_record: dict,
             accelerator, dtype, directory: Path) -> dict:
    """Score `rows` (as eval_benchmark.py loaded them) with the PM at `model_path`; write the record dir."""
    from rlhfkit.eval.reward_scoring import write_run
    from rlhfkit.eval import rewardbench2 as rb2
    from rlhfkit.eval.rewardbench import format_table, is_rewardbench, rewardbench_summary
    from rlhfkit.preference_model import PreferenceModelScorer, response_text
    from rlhfkit.scoring import shard_and_gather

    from rlhfkit.eval.rewardbench import model_position_limit

    scorer = PreferenceModelScorer(model_path, batch_size=script_args.batch_size, max_length=script_args.max_length,
                                   device=accelerator.device, dtype=dtype)
    limit = model_position_limit(scorer.model)  # never beyond the model's own positions (counted as truncation)
    if limit and (scorer.max_length is None or scorer.max_length > limit):
        scorer.max_length = limit
    results: dict = {"model": script_args.reward_model_path, "model_record": model_record, "benchmark": benchmark,
                     "scoring": "pairwise_preference_model", "template": scorer.template.to_dict(),
                     "datasets": script_args.dataset_path, "data_report": data_report,
                     "processes": accelerator.num_processes}
    if benchmark == "v2":
        scored = [row for row in rows if not rb2.is_ties(row["subset"])]
        comparisons, owner = [], []
        for r, row in enumerate(scored):
            for j in range(row["num_chosen"], len(row["completions"])):
                comparisons.append((row["prompt"], row["completions"][0], row["completions"][j]))
                owner.append(r)
        probabilities = shard_and_gather(lambda part: scorer.compare(part, progress=accelerator.is_main_process),
                                         comparisons, accelerator)
        per_row_p: list[list[float]] = [[] for _ in scored]
        for r, p in zip(owner, probabilities):
            per_row_p[r].append(p)
        credits = [best_of_n_credit(ps) for ps in per_row_p]
        per_subset: dict[str, dict] = {}
        for subset in sorted({row["subset"] for row in scored}):
            values = [c for c, row in zip(credits, scored) if row["subset"] == subset]
            per_subset[subset] = {"n": len(values), "score": sum(values) / len(values), "correct": sum(values)}
        summary = rb2.summary(per_subset)
        skipped = len(rows) - len(scored)
        results.update({"rows": len(rows), "rows_scored": len(scored), "ties_rows_not_scored": skipped,
                        "comparisons": len(comparisons), "per_subset": per_subset, "rewardbench2": summary})
        table = rb2.format_table(per_subset, summary)
        table += (f"\n\n{'Rows scored':<28}{len(scored):>16}   ({len(comparisons)} comparisons, both orders each; "
                  f"{skipped} Ties rows not scored: a preference model gives no per-completion score)")
        scores_lines = [{"id": row["id"], "subset": row["subset"], "p_first_beats": ps, "result": c}
                        for row, ps, c in zip(scored, per_row_p, credits)]
        metrics = {"score": summary["score"], "score_present_subsets": summary["score_present_subsets"],
                   "rows": len(scored), **summary["subsets"]}
    else:
        comparisons = [(row["prompt"], response_text(row["chosen"]), response_text(row["rejected"])) for row in rows]
        probabilities = shard_and_gather(lambda part: scorer.compare(part, progress=accelerator.is_main_process),
                                         comparisons, accelerator)
        credits = pair_credits(probabilities)
        subsets = [row.get("subset") for row in rows]
        rewardbench = benchmark == "v1" or is_rewardbench(subsets)
        if not any(subsets):
            sources = {row.get("source") for row in rows}
            subsets = [row.get("source") for row in rows] if len(sources) > 1 else [None] * len(rows)
        per_subset = credit_accuracies(subsets, credits)
        summary = rewardbench_summary(per_subset) if rewardbench else None
        n = len(rows)
        results.update({"pairs": n, "accuracy": sum(credits) / n, "ties": sum(c == 0.5 for c in credits),
                        "per_subset": per_subset, "rewardbench": summary})
        table = format_table(per_subset, summary)
        table += (f"\n\n{'Accuracy (all pairs)':<28}{100 * results['accuracy']:>16.2f}   ({n} pairs, "
                  f"{results['ties']} ties at P = 0.5, half credit)")
        scores_lines = [{"id": row.get("id", str(i)), "subset": row.get("subset"),
                         "source": row.get("source"), "p_chosen_beats_rejected": p, "correct": c}
                        for i, (row, p, c) in enumerate(zip(rows, probabilities, credits))]
        metrics = {"accuracy": results["accuracy"], "pairs": n}
        if summary:
            metrics.update({"score": summary["score"], "legacy_score": summary["legacy_score"],
                            **summary["sections"]})
    results["truncated_sequences"] = scorer.counts["truncated_sequences"]
    table += (f"\n{'Truncated':<28}{scorer.counts['truncated_sequences']:>16}   comparison sequences longer than "
              f"{scorer.max_length} tokens (last tokens kept: the answer is read at the end)")
    if accelerator.is_main_process:
        write_run(Path(directory), results, scores_lines, metrics, table)
    accelerator.wait_for_everyone()
    results["metrics"] = metrics
    return results


SUPPORTED = ("v1", "v2", "pairs")


class Evaluator:
    """eval_benchmark.py's scorer for a PM (the interface of rlhfkit/eval/reward_scoring.Scorer: `runs`, `evaluate`).
    RM-Bench, RMB and JudgeBench compare responses in ways not defined for a PM here: refused alone, skipped (and
    listed) in `--benchmark all`."""

    def __init__(self, args, accelerator, dtype, model_path: str, model_record: dict):
        self.args, self.accelerator, self.dtype = args, accelerator, dtype
        self.model_path, self.record = model_path, model_record

    def runs(self, args) -> tuple[list[dict], list[dict]]:
        from rlhfkit.errors import UserError
        from rlhfkit.eval.benchmarks import plan_runs

        runs, skipped = plan_runs(args, dpo=False)
        refused = [run for run in runs if run["benchmark"] not in SUPPORTED]
        if refused and len(refused) == len(runs):
            raise UserError(f"{args.reward_model_path}: a pairwise preference model is scored on RewardBench v1 / v2 "
                            f"and preference pairs only, not {', '.join(run['name'] for run in refused)}")
        if refused:
            logger.warning("preference model: skipped %s (not defined for a pairwise preference model)",
                           ", ".join(run["name"] for run in refused))
        skipped += [{"file": f, "reason": "not defined for a pairwise preference model"}
                    for run in refused for f in run["paths"]]
        return [run for run in runs if run["benchmark"] in SUPPORTED], skipped

    def evaluate(self, run: dict, directory: Path) -> dict:
        from rlhfkit.errors import UserError
        from rlhfkit.eval.benchmarks import get

        data = get(run["benchmark"]).load(run["paths"], self.args.dataset_split, self.args.skip_invalid_rows)
        if not data.rows:
            raise UserError(f"{run['paths'][0]}: no rows to evaluate")
        return evaluate(self.args, run["benchmark"], data.rows, data.report, self.model_path, self.record,
                        self.accelerator, self.dtype, directory)
