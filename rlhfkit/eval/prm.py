"""eval_benchmark.py's scorer for a process reward model (prm_train.py output; rlhfkit/process_reward.py).

Two kinds of rows, detected per file:
- step-labelled rows (stepwise, Math-Shepherd or PRM800K, as prm_train.py reads them): every step scored in one
  forward per row; step accuracy (P(+) > 0.5 is "correct"), precision / recall / F1 of the wrong steps (the class a
  PRM exists to find) and of the correct ones;
- best-of-N rows as RLHFlow publishes them (`RLHFlow/*-GSM8K-Test`, `*-MATH500-Test`: `prompt`, `answers` [N],
  `label` [N] with 1 = correct; `labels` is accepted too): each answer split into steps at the PRM's step separator
  (`rlhfkit.process_reward.split_steps`), scored, reduced by each aggregate (min, last, prod, mean); the answer with
  the highest aggregate is selected (the first one on a tie, as `scores_list.index(max(scores_list))`), and a
  problem counts when it is correct (math-rm/prm_evaluate.py @ 5b2a281c, which selects by the mean). Reported for
  every aggregate, `--aggregate` first; with the first answer's accuracy (N = 1) and the share of problems with any
  correct answer (the ceiling) beside them. `--num_n` keeps the first N answers, as prm_evaluate.py's `--num_n`.
What differs from prm_evaluate.py: RLHFlow splits Mistral answers at "ки\\n" and Deepseek's at "\\n\\n" by a
`--model_type` flag; we split at the separator the PRM was trained with (run_info.json).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path


logger = logging.getLogger(__name__)


def is_best_of_n_record(record) -> bool:
    return isinstance(record, dict) and "answers" in record and ("label" in record or "labels" in record)


def best_of_n_rows(paths: list[str], split: str, skip_invalid: bool, num_n: int | None) -> list[dict]:
    """{"prompt": [messages], "answers": [str], "correct": [bool]} per problem; bad rows are one line."""
    from rlhfkit.errors import UserError, where
    from rlhfkit.files import read_records

    rows = []
    for path in paths:
        for number, record in enumerate(read_records(path, split=split, skip_invalid=skip_invalid), start=1):
            loc = where(path, number)
            if not is_best_of_n_record(record):
                raise UserError(f"{loc}: not a best-of-N row (prompt, answers [N], label [N])")
            labels = record.get("label", record.get("labels"))
            answers, prompt = record["answers"], record.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError(f"{loc}: field 'prompt': expected a non-empty string")
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise UserError(f"{loc}: field 'answers': expected a non-empty list of strings")
            if not isinstance(labels, list) or len(labels) != len(answers) or any(v not in (0, 1) for v in labels):
                raise UserError(f"{loc}: field 'label': expected one 0/1 per answer ({len(answers)})")
            keep = num_n or len(answers)
            rows.append({"prompt": [{"role": "user", "content": prompt}], "answers": answers[:keep],
                         "correct": [bool(v) for v in labels[:keep]]})
    return rows


def class_report(predicted_correct: list[bool], actual_correct: list[bool]) -> dict:
    def f1(target: bool) -> dict:
        tp = sum(p == target and a == target for p, a in zip(predicted_correct, actual_correct))
        predicted = sum(p == target for p in predicted_correct)
        actual = sum(a == target for a in actual_correct)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        return {"precision": precision, "recall": recall,
                "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0, "n": actual}

    n = len(actual_correct)
    return {"steps": n, "step_accuracy": sum(p == a for p, a in zip(predicted_correct, actual_correct)) / n,
            "wrong_steps": f1(False), "correct_steps": f1(True)}


def select(scores: list[float]) -> int:
    """Index of the highest score, the first on a tie (list.index(max(...)))."""
    return scores.index(max(scores))


def best_of_n_report(step_scores: list[list[list[float]]], correct: list[list[bool]], first: str) -> dict:
    from rlhfkit.process_reward import AGGREGATES, aggregate

    order = [first] + [a for a in AGGREGATES if a != first]
    out = {"problems": len(correct), "mean_n": sum(map(len, correct)) / max(len(correct), 1)}
    for how in order:
        hits = 0
        for problem_scores, problem_correct in zip(step_scores, correct):
            values = [aggregate(s, how) if s else float("-inf") for s in problem_scores]
            hits += problem_correct[select(values)]
        out[f"best_of_n_{how}"] = hits / len(correct)
    out["first_answer"] = sum(c[0] for c in correct) / len(correct)
    out["any_correct"] = sum(any(c) for c in correct) / len(correct)
    return out


def evaluate(script_args, model_path: str, model_record: dict, accelerator, dtype, directory: Path) -> dict:
    """Score the PRM at `model_path` on every --dataset_path file; write the record dir."""
    from rlhfkit.eval.reward_scoring import write_run
    from rlhfkit.errors import UserError
    from rlhfkit.files import read_records
    from rlhfkit.process_reward import ProcessRewardScorer, load_step_rows, split_steps
    from rlhfkit.scoring import shard_and_gather

    how = getattr(script_args, "aggregate", "min")
    scorer = ProcessRewardScorer(model_path, batch_size=script_args.batch_size, max_length=script_args.max_length,
                                 device=accelerator.device, aggregate=how, dtype=dtype)
    step_files, bon_files = [], []
    for path in script_args.dataset_path:
        first = next(iter(read_records(path, split=script_args.dataset_split,
                                       skip_invalid=script_args.skip_invalid_rows)), None)
        (bon_files if is_best_of_n_record(first) else step_files).append(path)
    results: dict = {"model": script_args.reward_model_path, "model_record": model_record, "benchmark": "prm",
                     "aggregate": how, "format": scorer.format.to_dict(), "datasets": script_args.dataset_path}
    lines, scores_lines = [], []

    def score(items):
        flat = shard_and_gather(lambda part: [json.dumps(s) for s in scorer.score_steps(part)], items, accelerator)
        return [json.loads(s) for s in flat]

    if step_files:
        rows, report = load_step_rows(step_files, script_args.dataset_split, script_args.skip_invalid_rows)
        scored = score([(row["prompt"], row["steps"]) for row in rows])
        predicted, actual, unscored = [], [], 0
        for row, values in zip(rows, scored):
            unscored += len(row["steps"]) - len(values)
            predicted += [v > 0.5 for v in values]
            actual += row["labels"][: len(values)]
            scores_lines.append({"prompt": row["prompt"][-1]["content"][:80], "step_scores": values,
                                 "labels": row["labels"]})
        if not actual:
            raise UserError(f"{step_files[0]}: no step could be scored within --max_length")
        steps = class_report(predicted, actual)
        steps.update({"rows": len(rows), "data_report": report, "steps_beyond_max_length": unscored})
        results["steps"] = steps
        lines += [f"{'Step accuracy':<32}{100 * steps['step_accuracy']:>10.2f}   ({steps['steps']} steps, "
                  f"{len(rows)} rows; P(+) > 0.5 is 'correct')",
                  f"{'Wrong steps: F1':<32}{100 * steps['wrong_steps']['f1']:>10.2f}   (precision "
                  f"{100 * steps['wrong_steps']['precision']:.2f}, recall {100 * steps['wrong_steps']['recall']:.2f}, "
                  f"{steps['wrong_steps']['n']} steps)",
                  f"{'Correct steps: F1':<32}{100 * steps['correct_steps']['f1']:>10.2f}"]
    if bon_files:
        problems = best_of_n_rows(bon_files, script_args.dataset_split, script_args.skip_invalid_rows,
                                  getattr(script_args, "num_n", None))
        items, owner = [], []
        for p, problem in enumerate(problems):
            for answer in problem["answers"]:
                items.append((problem["prompt"], [s for s, _ in split_steps(answer, scorer.format)]))
                owner.append(p)
        scorable = [k for k, (_, steps) in enumerate(items) if steps]
        values = score([items[k] for k in scorable])
        per_answer: list[list[float]] = [[] for _ in items]
        for k, v in zip(scorable, values):
            per_answer[k] = v
        grouped: list[list[list[float]]] = [[] for _ in problems]
        for k, p in enumerate(owner):
            grouped[p].append(per_answer[k])
        bon = best_of_n_report(grouped, [p["correct"] for p in problems], how)
        results["best_of_n"] = bon
        lines.append(f"{'Best-of-N (' + how + ')':<32}{100 * bon[f'best_of_n_{how}']:>10.2f}   ({bon['problems']} "
                     f"problems, N = {bon['mean_n']:.1f} on average)")
        lines += [f"{'  by ' + a:<32}{100 * bon[f'best_of_n_{a}']:>10.2f}"
                  for a in ("min", "last", "prod", "mean") if a != how]
        lines += [f"{'  first answer (N = 1)':<32}{100 * bon['first_answer']:>10.2f}",
                  f"{'  any answer correct':<32}{100 * bon['any_correct']:>10.2f}"]
        for problem, answer_scores in zip(problems, grouped):
            scores_lines.append({"prompt": problem["prompt"][-1]["content"][:80],
                                 "step_scores": answer_scores, "label": problem["correct"]})
    metrics = {}
    if "steps" in results:
        metrics.update({"step_accuracy": results["steps"]["step_accuracy"],
                        "wrong_step_f1": results["steps"]["wrong_steps"]["f1"]})
    if "best_of_n" in results:
        metrics.update({k: v for k, v in results["best_of_n"].items() if k.startswith("best_of_n")})
    table = "\n".join(lines)
    if accelerator.is_main_process:
        write_run(Path(directory), results, scores_lines, metrics, table)
    accelerator.wait_for_everyone()
    results["metrics"] = metrics
    return results


class Evaluator:
    """eval_benchmark.py's scorer for a PRM (the interface of rlhfkit/eval/reward_scoring.Scorer: `runs`,
    `evaluate`): one run over every --dataset_path file, each detected as step-labelled or best-of-N."""

    def __init__(self, args, accelerator, dtype, model_path: str, model_record: dict):
        self.args, self.accelerator, self.dtype = args, accelerator, dtype
        self.model_path, self.record = model_path, model_record

    def runs(self, args) -> tuple[list[dict], list[dict]]:
        return [{"name": "prm", "benchmark": "prm", "paths": list(args.dataset_path)}], []

    def evaluate(self, run: dict, directory: Path) -> dict:
        return evaluate(self.args, self.model_path, self.record, self.accelerator, self.dtype, directory)
