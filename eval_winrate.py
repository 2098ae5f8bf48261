"""Win rate of policy A against policy B on the same prompts, judged pairwise.

    python eval_winrate.py --responses_a runs/gen-more --responses_b runs/gen-multitask \\
        --reward_model_path runs/rm --output_dir runs/winrate-more-vs-multitask
    python eval_winrate.py --responses_a a.jsonl --responses_b b.jsonl --judge_api_base https://api.openai.com/v1 \\
        --judge_model gpt-4o-mini --judge_template harmless --output_dir runs/winrate-harmless

Inputs: two generation outputs (`generation/generate.py` dirs, or their `generations.jsonl`, or any JSONL/JSON with
rows `{"id", "prompt": [messages], "responses": [strings]}`). Rows are matched by `id` when every row of both files
has one (a matched id with different prompts is an error), else by prompt; the response judged is
`responses[--response_index]`. Unmatched rows are counted and reported.

Judges (rlhfkit/judges.py): (a) `--reward_model_path`, a reward model from disk (the higher reward wins);
(b) `--judge_api_base` + `--judge_model`, an OpenAI-compatible chat endpoint with a helpful or harmless template,
every pair asked in both orders to cancel position bias, the API key read from the environment variable named by
`--judge_api_key_env` (default OPENAI_API_KEY; never logged or written). Timeouts, HTTP errors and malformed
replies are retried `--judge_max_retries` times.

Output (`--output_dir`, written as `OUT.partial/` and renamed, like every stage): winrate.json (counts, win rate,
confidence interval, judge description), judgments.jsonl (one line per prompt), table.txt (what is printed),
metrics.json, args.yaml, run_info.json.

Statistics: win rate = (wins + ½·ties) / judged pairs, with a Wilson score interval at `--confidence`. A tie counts
as half a success; since a tie's variance (¼) is below what the Bernoulli formula assumes, the interval is
conservative when there are ties.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.errors import UserError, where
from rlhfkit.generations import GENERATIONS_FILE

logger = logging.getLogger("eval_winrate")

@dataclass
class ScriptArguments:
    responses_a: str = field(default=None, metadata={"help": "Policy A's generation output (dir or JSONL file)."})
    responses_b: str = field(default=None, metadata={"help": "Policy B's generation output (dir or JSONL file)."})
    output_dir: str = field(default=None, metadata={"help": "Where results are written (atomically)."})
    name_a: str = field(default=None, metadata={"help": "Display name of policy A (default: from the path)."})
    name_b: str = field(default=None, metadata={"help": "Display name of policy B (default: from the path)."})
    response_index: int = field(default=0, metadata={"help": "Which of each row's `responses` to judge."})
    match_by: str = field(default="auto", metadata={"help": "auto | id | prompt: how rows of A and B are paired "
                          "(auto: by id when every row has one)."})
    max_samples: int = field(default=None, metadata={"help": "Judge only the first N matched prompts."})
    confidence: float = field(default=0.95, metadata={"help": "Level of the Wilson confidence interval."})
    # judge (a): a reward model
    reward_model_path: str = field(default=None, metadata={"help": "Judge (a): reward model dir or built-in name."})
    batch_size: int = field(default=8, metadata={"help": "Reward model: sequences per forward pass."})
    max_length: int = field(default=None, metadata={"help": "Reward model: cut longer conversations from the left."})
    chat_template: str = field(default=None, metadata={"help": "Reward model: template if its tokenizer has none."})
    dtype: str = field(default="float32", metadata={"help": "Reward model: float32 | bfloat16 | float16."})
    tie_threshold: float = field(default=0.0, metadata={"help": "Reward model: |r_A − r_B| ≤ this is a tie."})
    # judge (b): an OpenAI-compatible chat API
    judge_api_base: str = field(default=None, metadata={"help": "Judge (b): base URL, e.g. https://api.openai.com/v1 "
                                "or http://127.0.0.1:8000/v1 (vLLM)."})
    judge_model: str = field(default=None, metadata={"help": "Judge (b): model name sent to the endpoint."})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Judge (b): environment variable "
                                   "holding the API key (the key itself is never a flag)."})
    judge_template: str = field(default="helpful", metadata={"help": "Judge (b): helpful | harmless."})
    judge_timeout: float = field(default=60.0, metadata={"help": "Judge (b): seconds per request."})
    judge_max_retries: int = field(default=3, metadata={"help": "Judge (b): retries after a timeout, HTTP 429/5xx or "
                                   "malformed reply."})
    judge_backoff: float = field(default=1.0, metadata={"help": "Judge (b): first retry delay in seconds (doubles)."})
    judge_concurrency: int = field(default=4, metadata={"help": "Judge (b): requests in flight."})
    judge_max_tokens: int = field(default=512, metadata={"help": "Judge (b): max tokens of each judgement."})
    on_judge_error: str = field(default="fail", metadata={"help": "Judge (b): fail | skip (a pair whose judgement "
                                "failed after its retries is left out and counted)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a complete --output_dir."})

    def __post_init__(self):
        if self.match_by not in ("auto", "id", "prompt"):
            raise ValueError(f"--match_by must be auto, id or prompt, not '{self.match_by}'")
        if not 0 < self.confidence < 1:
            raise ValueError("--confidence must be in (0, 1)")
        if self.response_index < 0:
            raise ValueError("--response_index must be ≥ 0")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, not '{self.dtype}'")
        if (self.reward_model_path is None) == (self.judge_api_base is None):
            raise ValueError("give exactly one judge: --reward_model_path or --judge_api_base (with --judge_model)")


# ---------------------------------------------------------------------------------------------------------------
# statistics (pure)
# ---------------------------------------------------------------------------------------------------------------
def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion `successes / n` (successes may be fractional: ties count ½)."""
    if n <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(outcomes: list[str | None], confidence: float = 0.95) -> dict:
    """Counts of win/tie/loss for policy A (None = a failed judgement), win rate with ties as ½, Wilson interval."""
    wins, ties, losses = (sum(o == kind for o in outcomes) for kind in ("win", "tie", "loss"))
    errors = sum(o is None for o in outcomes)
    n = wins + ties + losses
    if not n:  # nothing judged: no rate (None, not NaN, so the JSON stays standard)
        return {"wins": 0, "ties": 0, "losses": 0, "judged": 0, "errors": errors, "win_rate": None, "ci_low": None,
                "ci_high": None, "confidence": confidence, "interval": "wilson"}
    low, high = wilson_interval(wins + 0.5 * ties, n, confidence)
    return {"wins": wins, "ties": ties, "losses": losses, "judged": n, "errors": errors,
            "win_rate": (wins + 0.5 * ties) / n, "ci_low": low, "ci_high": high, "confidence": confidence,
            "interval": "wilson"}


def format_table(summary: dict, name_a: str, name_b: str, judge: str, extra: dict | None = None) -> str:
    n = summary["judged"]

    def share(count):
        return f"{100 * count / n:6.1f}%" if n else "     -"

    lines = [
        f"{name_a} (A) vs {name_b} (B), judged by {judge}",
        "",
        f"{'':<12}{'count':>8}{'share':>9}",
        f"{'A wins':<12}{summary['wins']:>8}{share(summary['wins']):>9}",
        f"{'ties':<12}{summary['ties']:>8}{share(summary['ties']):>9}",
        f"{'B wins':<12}{summary['losses']:>8}{share(summary['losses']):>9}",
        f"{'judged':<12}{n:>8}",
    ]
    if summary["errors"]:
        lines.append(f"{'failed':<12}{summary['errors']:>8}   (left out)")
    lines.append("")
    if n:
        lines.append(
            f"win rate of A (ties = 1/2): {100 * summary['win_rate']:.1f}%  "
            f"[{100 * summary['confidence']:.0f}% Wilson CI "
            f"{100 * summary['ci_low']:.1f}% – {100 * summary['ci_high']:.1f}%]"
        )
    for key, value in (extra or {}).items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------
def read_generations(path: str, response_index: int) -> list[dict]:
    """Rows `{"row", "id", "prompt", "response"}` of a generation output (`rlhfkit.generations.read_generations`:
    its validation, its id rule), `id` None for a row that has none of its own (then `--match_by auto` matches by
    prompt), `response` the one judged."""
    from rlhfkit.generations import read_generations as read_rows

    rows = read_rows(path)
    without_id = set(rows.rows_without_id)
    out = []
    for number, row in enumerate(rows, start=1):
        if response_index >= len(row["responses"]):
            raise UserError(f"{where(rows.path, number, 'responses')}: has {len(row['responses'])} responses, "
                            f"--response_index {response_index} is out of range")
        out.append({"row": number, "id": None if number in without_id else row["id"], "prompt": row["prompt"],
                    "response": row["responses"][response_index]})
    return out


def _key(row: dict, by: str) -> str:
    from rlhfkit.prompts import prompt_id

    return row["id"] if by == "id" else prompt_id(row["prompt"])


def match_rows(rows_a: list[dict], rows_b: list[dict], by: str, file_a: str, file_b: str) -> tuple[list, dict]:
    """Pairs (row_a, row_b) in A's order, and counts of unmatched rows. Duplicate keys are errors."""
    if by == "auto":
        by = "id" if all(r["id"] is not None for r in rows_a + rows_b) else "prompt"
    index_b = {}
    for file, rows in ((file_a, rows_a), (file_b, rows_b)):
        seen = {}
        for row in rows:
            if by == "id" and row["id"] is None:
                raise UserError(f"{where(file, row['row'], 'id')}: missing, and --match_by id needs it")
            key = _key(row, by)
            if key in seen:
                raise UserError(f"{where(file, row['row'], by)}: same {by} as row {seen[key]}; rows must be unique")
            seen[key] = row["row"]
        if rows is rows_b:
            index_b = {_key(row, by): row for row in rows}
    pairs = []
    for row_a in rows_a:
        row_b = index_b.get(_key(row_a, by))
        if row_b is None:
            continue
        if by == "id" and row_a["prompt"] != row_b["prompt"]:
            raise UserError(f"{where(file_b, row_b['row'], 'prompt')}: id '{row_a['id']}' has a different prompt "
                            f"than in {file_a} row {row_a['row']}; were they generated from the same prompt set?")
        pairs.append((row_a, row_b))
    counts = {"matched_by": by, "matched": len(pairs), "only_in_a": len(rows_a) - len(pairs),
              "only_in_b": len(rows_b) - len(pairs)}
    return pairs, counts


def _display_name(path: str) -> str:
    """The generation dir's name for `DIR` or `DIR/generations.jsonl`, else the file name without extensions."""
    target = Path(path)
    if target.is_dir():
        return target.name
    if target.name == GENERATIONS_FILE:
        return target.parent.name or target.stem
    return target.name.split(".")[0] or target.name


# ---------------------------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------------------------
ARGUMENTS = (ScriptArguments,)  # what main takes, in order (CLI, YAML, tests)


def main(script_args: ScriptArguments) -> dict:
    # ---------------------------------------------------------------- setup
    from rlhfkit.distributed import new_accelerator

    from rlhfkit.checkpoints import StageOutput
    from rlhfkit.files import write_json_atomic, write_text_atomic
    from rlhfkit.eval.judges import ApiJudge, RewardModelJudge

    for flag in ("responses_a", "responses_b", "output_dir"):
        if not getattr(script_args, flag):
            raise UserError(f"--{flag} is required")
    accelerator = new_accelerator()
    setup_logging(accelerator.is_main_process)
    output = StageOutput(script_args.output_dir, stage="eval_winrate", overwrite=script_args.overwrite_output_dir)
    name_a = script_args.name_a or _display_name(script_args.responses_a)
    name_b = script_args.name_b or _display_name(script_args.responses_b)

    # ---------------------------------------------------------------- model & tokenizer (the judge)
    run_info: dict = {}
    if script_args.reward_model_path:

        from rlhfkit.scoring import RewardModelScorer

        from rlhfkit.models import torch_dtype

        dtype = torch_dtype(script_args.dtype)
        scorer = RewardModelScorer(script_args.reward_model_path, script_args.batch_size, script_args.max_length,
                                   accelerator.device, chat_template=script_args.chat_template,
                                   accelerator=accelerator, dtype=dtype)
        model_record = scorer.record
        judge = RewardModelJudge(scorer, script_args.tie_threshold)
        judge_text = f"reward model {script_args.reward_model_path}"
        judge_record = {"kind": "reward_model", "model": script_args.reward_model_path, **model_record}
        run_info["parent"] = {"path": model_record.get("resolved_path", scorer.path),
                              "stage": model_record.get("parent_stage")}
    else:
        judge = ApiJudge(script_args.judge_api_base, script_args.judge_model, script_args.judge_template,
                         script_args.judge_api_key_env, script_args.judge_timeout, script_args.judge_max_retries,
                         script_args.judge_backoff, max_tokens=script_args.judge_max_tokens,
                         concurrency=script_args.judge_concurrency, on_error=script_args.on_judge_error)
        judge_text = (f"{script_args.judge_model} at {judge.endpoint} "
                      f"({script_args.judge_template} template, both orders)")
        judge_record = judge.describe()

    # ---------------------------------------------------------------- data
    rows_a = read_generations(script_args.responses_a, script_args.response_index)
    rows_b = read_generations(script_args.responses_b, script_args.response_index)
    pairs, match_counts = match_rows(rows_a, rows_b, script_args.match_by, script_args.responses_a,
                                     script_args.responses_b)
    if not pairs:
        raise UserError(f"{script_args.responses_a} and {script_args.responses_b} share no prompts "
                        f"(matched by {match_counts['matched_by']})")
    if match_counts["only_in_a"] or match_counts["only_in_b"]:
        logger.warning("unmatched rows: %d only in A, %d only in B (judging the %d shared prompts)",
                       match_counts["only_in_a"], match_counts["only_in_b"], len(pairs))
    if script_args.max_samples is not None:
        pairs = pairs[: script_args.max_samples]

    # ---------------------------------------------------------------- judge the pairs
    prompts = [row_a["prompt"] for row_a, _ in pairs]
    responses_a = [row_a["response"] for row_a, _ in pairs]
    responses_b = [row_b["response"] for _, row_b in pairs]
    if isinstance(judge, ApiJudge) and not accelerator.is_main_process:
        results = None  # one process talks to the API
    else:
        results = judge.judge(prompts, responses_a, responses_b, progress=accelerator.is_main_process)

    # ---------------------------------------------------------------- save
    summary = None
    if accelerator.is_main_process:
        summary = summarize([r["outcome"] for r in results], script_args.confidence)
        extra = {"prompts": f"{len(pairs)} matched by {match_counts['matched_by']}"
                            f" ({match_counts['only_in_a']} only in A, {match_counts['only_in_b']} only in B)"}
        if isinstance(judge, ApiJudge):
            judged = [r for r in results if r["outcome"] is not None]
            if judged:
                consistency = sum(r["consistent"] for r in judged) / len(judged)
                summary["order_consistency"] = consistency
                extra["verdicts consistent across both orders"] = f"{100 * consistency:.1f}%"
        table = format_table(summary, name_a, name_b, judge_text, extra)
        lines = []
        for (row_a, row_b), result in zip(pairs, results):
            lines.append(json.dumps({"id": row_a["id"], "prompt": row_a["prompt"], "response_a": row_a["response"],
                                     "response_b": row_b["response"], **result}, ensure_ascii=False))
        write_text_atomic(output.staging / "judgments.jsonl", "\n".join(lines) + "\n")
        write_text_atomic(output.staging / "table.txt", table + "\n")
        report = {"a": {"name": name_a, "path": script_args.responses_a},
                  "b": {"name": name_b, "path": script_args.responses_b},
                  "response_index": script_args.response_index, "judge": judge_record, "matching": match_counts,
                  **summary}
        write_json_atomic(output.staging / "winrate.json", report)
        run_info.update({"judge": judge_record, "inputs": [script_args.responses_a, script_args.responses_b]})
        print(table)
    output.finalize(run_info, summary, to_dict(script_args))
    return summary


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
