"""JudgeBench (ScalerLab/JudgeBench, arXiv 2410.12784) scoring of a reward model, as pure functions.

Reference (read, not copied): ScalerLab/JudgeBench at e2c52c284e735e139b3daa61c206ee208f36c461: `utils/judges.py`
(the reward-model judges `InternLM2Reward`, `GRMReward`, `SkyworkReward`), `run_judge.py` (`judge_pairs`, `main`)
and `utils/metrics.py` (`flip_judgment`, `compute_final_metrics`).

Exactly JudgeBench:
- Rows (`data/dataset=judgebench,response_model=<model>.jsonl`; the hub's `ScalerLab/JudgeBench`, splits `gpt` and
  `claude`): `pair_id, original_id, source, question, response_model, response_A, response_B, label` with label
  `A>B` or `B>A` (which response is objectively correct). Each response is scored on its own as
  [user: question, assistant: response], untruncated (SkyworkReward and InternLM2Reward pass the whole
  conversation; GRMReward cuts at the tokenizer's model_max_length): only the model's own position limit applies.
- A reward-model judge decides `A>B` if score(first) > score(second), else `B>A`: a tie goes to the second response.
- run_judge.py judges every pair in both orders unless `--single_game` (the published reward-model outputs hold two
  judgments per pair): judgment 1 on (A, B), judgment 2 on (B, A), flipped back. A pair is correct when more of the
  two decisions match the label than match its flip (`compute_final_metrics`): for a reward model, correct iff the
  correct response scores strictly higher. A tie gives B>A then (flipped) A>B, one each way, so it is never correct.
- `--single_game` (one order): correct iff the decision equals the label, so a tie is right when the label is B>A.
- Scores are percentages of correct pairs: Overall and per category, `source.startswith(…)` with mmlu-pro
  (Knowledge), livebench-reasoning (Reasoning), livebench-math (Math), livecodebench (Coding), as run_judge.py
  prints them. The headline is Overall in both orders (run_judge.py's default).

Extra: the single-game numbers are reported too; ties and decisions that differ between orders are counted.
A label other than A>B / B>A is a one-line error (the metrics would count such a pair as never correct).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from rlhfkit.errors import UserError
from rlhfkit.eval.loading import completion_flags, load_rows, string_field

NAME = "judgebench"
CATEGORIES = (("Knowledge", "mmlu-pro"), ("Reasoning", "livebench-reasoning"), ("Math", "livebench-math"),
              ("Coding", "livecodebench"))
LABELS = ("A>B", "B>A")
LAYOUT = "JudgeBench rows: pair_id, source, question, response_A, response_B, label"


def is_record(record) -> bool:
    return isinstance(record, dict) and all(name in record for name in ("response_A", "response_B", "label"))


def category(source: str) -> str | None:
    for name, prefix in CATEGORIES:
        if source.startswith(prefix):
            return name
    return None


def flip(decision: str | None) -> str | None:
    """A>B ↔ B>A; anything else unchanged (flip_judgment)."""
    return {"A>B": "B>A", "B>A": "A>B"}.get(decision, decision)


# ---------------------------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------------------------
def judgebench_row(record: dict, loc: str, path: str = "") -> dict:
    """A JudgeBench record → {id, source, category, subset, label, prompt, completions [A, B]}."""
    question = string_field(record, "question", loc, LAYOUT)
    response_a = string_field(record, "response_A", loc, LAYOUT)
    response_b = string_field(record, "response_B", loc, LAYOUT)
    label = record.get("label")
    if label not in LABELS:
        raise UserError(f"{loc}: field 'label': must be 'A>B' or 'B>A', got {label!r}")
    source = record.get("source", "")
    if not isinstance(source, str):
        raise UserError(f"{loc}: field 'source': must be a string, got {type(source).__name__}")
    return {"id": str(record.get("pair_id", "")), "subset": source, "category": category(source), "label": label,
            "prompt": [{"role": "user", "content": question}], "completions": [response_a, response_b]}


def row_flags(row: dict) -> Counter:
    return completion_flags(row)


def load(paths: Sequence[str], split: str = "train", skip_invalid: bool = False):
    """Rows of JudgeBench files (data/*.jsonl, or `ScalerLab/JudgeBench` with --dataset_split gpt|claude)."""
    return load_rows(paths, judgebench_row, row_flags, split, skip_invalid)


def diagnostic_pairs(row: dict) -> list[tuple[int, int]]:
    """(correct, incorrect) completion indices."""
    return [(0, 1)] if row["label"] == "A>B" else [(1, 0)]


# ---------------------------------------------------------------------------------------------------------------
# scoring (pure)
# ---------------------------------------------------------------------------------------------------------------
def decide(score_first: float, score_second: float) -> str:
    """The reward-model judges' decision on (first, second): A>B only when the first scores strictly higher."""
    return "A>B" if score_first > score_second else "B>A"


def pair_outcome(score_a: float, score_b: float, label: str) -> dict:
    """Both decisions (the second flipped back to the original order) and the verdicts of both protocols."""
    decision1 = decide(score_a, score_b)
    decision2 = flip(decide(score_b, score_a))
    counter = sum(1 if d == label else -1 if d == flip(label) else 0 for d in (decision1, decision2))
    return {"decisions": [decision1, decision2], "correct": counter > 0, "tie": counter == 0,
            "inconsistent": decision1 != decision2, "correct_single_game": decision1 == label}


def _percent(values: list[bool]) -> float:
    return 100 * sum(values) / len(values)


def score_rows(rows: Sequence[dict]) -> tuple[dict, list[dict]]:
    """Overall and per-category scores (percent, both orders and single game) for rows carrying `scores` [A, B]."""
    per_row = [pair_outcome(row["scores"][0], row["scores"][1], row["label"]) for row in rows]
    groups: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        groups["Overall"].append(index)
        if row["category"] is not None:
            groups[row["category"]].append(index)
    results: dict = {}
    for name in [c for c, _ in CATEGORIES] + ["Overall"]:
        members = groups.get(name)
        if not members:
            continue
        outcomes = [per_row[i] for i in members]
        results[name] = {"n": len(members), "score": _percent([o["correct"] for o in outcomes]),
                         "score_single_game": _percent([o["correct_single_game"] for o in outcomes]),
                         "ties": sum(o["tie"] for o in outcomes),
                         "inconsistent": sum(o["inconsistent"] for o in outcomes)}
    uncategorised = sorted({row["subset"] for row in rows if row["category"] is None})
    return {"categories": results, "score": results["Overall"]["score"] if results else 0.0,
            "score_single_game": results["Overall"]["score_single_game"] if results else 0.0,
            "rows": len(rows), "uncategorised_sources": uncategorised}, per_row


def headline(result: dict) -> float:
    return result["score"]


def metrics(result: dict) -> dict:
    out = {"score": result["score"], "score_single_game": result["score_single_game"], "rows": result["rows"]}
    out.update({name: values["score"] for name, values in result["categories"].items() if name != "Overall"})
    return out


def format_table(result: dict) -> str:
    lines = [f"{'JudgeBench category':<24}{'n':>6}{'both orders':>13}{'single game':>13}{'ties':>6}"]
    for name in [c for c, _ in CATEGORIES] + ["Overall"]:
        values = result["categories"].get(name)
        if values is None:
            lines.append(f"{name:<24}{'-':>6}{'missing':>13}")
            continue
        if name == "Overall":
            lines.append("")
        lines.append(f"{name:<24}{values['n']:>6}{values['score']:>12.2f}%{values['score_single_game']:>12.2f}%"
                     f"{values['ties']:>6}")
    if result["uncategorised_sources"]:
        lines.append(f"  (in Overall only: sources {', '.join(result['uncategorised_sources'])})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# eval_benchmark.py's interface (rlhfkit/eval/benchmarks.py)
# ---------------------------------------------------------------------------------------------------------------
TITLE = 'JudgeBench'
HEADLINE = 'Overall, both orders'
GROUP = True
MAX_LENGTH = None  # its reward-model judges pass the whole conversation
TRUNCATION_SIDE = "left"
TRUNCATION_RULE = "JudgeBench's reward-model judges do not truncate; only the model's limit or --max_length, side 'left'"
DPO_MODE = True


def diagnostic_source(row: dict) -> str:
    """Calibration groups by category (its 17 sources would be too thin to bin)."""
    return row["category"] or "Other"


def split_runs(files: list[tuple[str, list]]) -> tuple[list[dict], list[dict]]:
    """`--benchmark all`: each JudgeBench file is its own run (run_judge.py scores one file at a time), named after
    its response model (dataset=judgebench,response_model=<model>.jsonl → judgebench-<model>)."""
    from pathlib import Path

    from rlhfkit.files import DATA_SUFFIXES

    if len(files) == 1:
        return [{"name": NAME, "benchmark": NAME, "paths": [files[0][0]]}], []
    runs = []
    for file, _ in files:
        name = Path(file).name
        stem = next((name[: -len(s)] for s in DATA_SUFFIXES if name.endswith(s)), name)
        runs.append({"name": f"{NAME}-{stem.split('response_model=')[-1]}", "benchmark": NAME, "paths": [file]})
    return runs, []
