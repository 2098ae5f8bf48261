"""Generation and annotation files: their names, the one reader of their rows, finding them in stage dirs, and the
pair/SFT/statistics files an annotation writes.

Files (schemas in docs/internals.md):
    generations.jsonl   generation/generate.py: `{"id", "prompt": [messages ending with user], "responses": [K
                        strings], "meta": {...}}`, one row per prompt
    rewards.jsonl       annotate/get_rewards.py: the generation row plus `"rewards": [K floats]`
    pairs.jsonl         canonical preference rows with `margin` (dpo_train.py reads it as is; not for best_of_k)
    sft.jsonl           best-of-K `{"messages": prompt + best response, "id", "reward"}` (sft_train.py reads it)
    reward_hist.png     histogram of all rewards and of the chosen/rejected rewards of the pairs

Ids, one rule for every reader (annotate/, eval_winrate.py, rlhfkit/report.py): a row's `id` as a string, else the
content id of its prompt (`rlhfkit.prompts.prompt_id`, the id `load_prompts` gives a prompt without one), so rows
without ids still name their prompt, the same way in every file. Two rows with one id are refused.

A stage dir is read through the stage contract (rlhfkit.checkpoints): `resolve_stage_file` refuses `.partial`
dirs, dirs with the INCOMPLETE marker and dirs whose run_info.json says incomplete.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import INCOMPLETE_MARKER, PARTIAL_SUFFIX, read_run_info
from .errors import UserError, where

logger = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"
REWARDS_FILE = "rewards.jsonl"  # annotated generations
PAIRS_FILE = "pairs.jsonl"
SFT_FILE = "sft.jsonl"
HISTOGRAM_FILE = "reward_hist.png"


# ---------------------------------------------------------------------------------------------------------------
# finding the file in a stage dir
# ---------------------------------------------------------------------------------------------------------------
def resolve_stage_file(path: str | os.PathLike, name: str, role: str) -> str:
    """`path` itself if a file; `path/name` if `path` is a complete stage dir (refusing unfinished ones)."""
    path = str(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        info = read_run_info(path)
        if path.rstrip("/").endswith(PARTIAL_SUFFIX) or (info is not None and not info.get("complete")) or \
                os.path.exists(os.path.join(path, INCOMPLETE_MARKER)):
            raise UserError(f"{path}: {role} dir is incomplete (the run that wrote it did not finish)")
        if not os.path.isfile(os.path.join(path, name)):
            raise UserError(f"{path}: {role} dir has no {name}")
        return os.path.join(path, name)
    if os.path.isdir(path.rstrip("/") + PARTIAL_SUFFIX):
        raise UserError(f"{path}: does not exist; {path.rstrip('/')}{PARTIAL_SUFFIX} is an unfinished run (rerun it)")
    raise UserError(f"{path}: {role} file not found")


# ---------------------------------------------------------------------------------------------------------------
# the one reader
# ---------------------------------------------------------------------------------------------------------------
def row_id(row: dict, prompt: list[dict]) -> str:
    """The id rule: the row's `id` as a string, else the content id of its prompt."""
    from .prompts import prompt_id

    return str(row["id"]) if row.get("id") is not None else prompt_id(prompt)


def validate_generation_row(row, path, number: int, need_rewards: bool = False) -> dict:
    """Check one generation (or annotated) row; return it with `id` set by the id rule (a string prompt is taken as
    one user turn)."""
    if not isinstance(row, dict):
        raise UserError(f"{where(path, number)}: a row must be an object")
    for key in ("prompt", "responses") + (("rewards",) if need_rewards else ()):
        if key not in row:
            raise UserError(f"{where(path, number, key)}: missing (expected a generate.py"
                            f"{'/get_rewards.py' if need_rewards else ''} row)")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt or any(
        not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)
        for m in prompt
    ):
        raise UserError(f"{where(path, number, 'prompt')}: must be a non-empty list of {{role, content}} messages")
    if prompt[-1]["role"] != "user":
        raise UserError(f"{where(path, number, 'prompt')}: must end with a user turn")
    responses = row["responses"]
    if not isinstance(responses, list) or not responses or any(not isinstance(r, str) for r in responses):
        raise UserError(f"{where(path, number, 'responses')}: must be a non-empty list of strings")
    if need_rewards:
        rewards = row["rewards"]
        if not isinstance(rewards, list) or len(rewards) != len(responses) or any(
            isinstance(r, bool) or not isinstance(r, (int, float)) or r != r for r in rewards
        ):
            raise UserError(f"{where(path, number, 'rewards')}: must be a list of numbers, one per response")
    return {**row, "prompt": prompt, "id": row_id(row, prompt)}


class GenerationRows(list):
    """Rows of one generation or annotation file (row n of the file is item n-1), each with `id` by the id rule.
    `path`: the file read; `rows_without_id`: the numbers of the rows whose id came from their prompt."""

    def __init__(self, rows, path: str, rows_without_id: list[int]):
        super().__init__(rows)
        self.path = path
        self.rows_without_id = rows_without_id

    @property
    def ids_given(self) -> bool:
        return not self.rows_without_id


def read_generations(path: str | os.PathLike, need_rewards: bool = False) -> GenerationRows:
    """The validated rows of a generations.jsonl or rewards.jsonl file (`need_rewards`: the latter), or of the
    stage dir holding it; one-line errors naming file, row and field."""
    from .files import read_records

    path = resolve_stage_file(path, REWARDS_FILE if need_rewards else GENERATIONS_FILE,
                              "annotation" if need_rewards else "generation")
    records = read_records(path)
    rows = [validate_generation_row(row, path, n, need_rewards) for n, row in enumerate(records, start=1)]
    if not rows:
        raise UserError(f"{path}: no rows")
    seen: dict[str, int] = {}
    for number, (record, row) in enumerate(zip(records, rows), start=1):
        if row["id"] in seen:
            what = f"'{row['id']}'" if record.get("id") is not None else "its prompt (the id of a row without one)"
            raise UserError(f"{where(path, number, 'id')}: {what} repeats row {seen[row['id']]}")
        seen[row["id"]] = number
    return GenerationRows(rows, path, [n for n, record in enumerate(records, start=1) if record.get("id") is None])


# ---------------------------------------------------------------------------------------------------------------
# what an annotation writes: pairs, best-of-K SFT rows, statistics, histogram
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PairArguments:
    pair_strategy: str = field(default="max_min",
                               metadata={"help": "max_min | max_random | random | best_of_k (see rlhfkit/pairs.py)."})
    min_margin: float = field(default=0.0,
                              metadata={"help": "Drop pairs (and best-of-K rows) whose reward margin is below this."})
    pair_seed: int = field(default=42, metadata={"help": "Seed of the random draws of max_random / random."})
    histogram_bins: int = field(default=40, metadata={"help": "Bins of reward_hist.png."})

    def __post_init__(self):
        from .pairs import PAIR_STRATEGIES

        if self.pair_strategy not in PAIR_STRATEGIES:
            raise ValueError(f"--pair_strategy must be one of {', '.join(PAIR_STRATEGIES)}, not '{self.pair_strategy}'")
        if self.min_margin < 0:
            raise ValueError("--min_margin must be ≥ 0")


def annotation_outputs(pair_strategy: str) -> dict:
    """The `outputs` record of run_info.json: which annotation files the dir holds."""
    return {"pairs": PAIRS_FILE if pair_strategy != "best_of_k" else None, "sft": SFT_FILE, "histogram": HISTOGRAM_FILE}


def save_histogram(path: Path, rewards: list[float], chosen: list[float], rejected: list[float], bins: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(rewards, bins=bins, alpha=0.5, label=f"all responses (n={len(rewards)})", color="tab:gray")
    if chosen:
        axis.hist(chosen, bins=bins, alpha=0.5, label=f"chosen (n={len(chosen)})", color="tab:green")
        axis.hist(rejected, bins=bins, alpha=0.5, label=f"rejected (n={len(rejected)})", color="tab:red")
    axis.set_xlabel("reward")
    axis.set_ylabel("count")
    axis.set_title("Rewards of generated responses")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_pairs_and_stats(directory: Path, rows: list[dict], args: PairArguments) -> dict:
    """Write pairs.jsonl (unless best_of_k), sft.jsonl and reward_hist.png into `directory`; return metrics."""
    from .files import write_jsonl_atomic
    from .pairs import build_pairs, reward_statistics

    pairs, sft, report = build_pairs(rows, args.pair_strategy, args.min_margin, args.pair_seed)
    if args.pair_strategy != "best_of_k":
        write_jsonl_atomic(directory / PAIRS_FILE, pairs)
    write_jsonl_atomic(directory / SFT_FILE, sft)
    stats = reward_statistics([row["rewards"] for row in rows])
    by_id = {row["id"]: row for row in rows}
    chosen, rejected = [], []
    for pair in pairs:  # rewards of the two sides, looked up by text in the source row
        row = by_id[pair["id"]]
        rewards = dict(zip(row["responses"], row["rewards"]))
        chosen.append(rewards[pair["chosen"][0]["content"]])
        rejected.append(rewards[pair["rejected"][0]["content"]])
    save_histogram(directory / HISTOGRAM_FILE, [r for row in rows for r in row["rewards"]], chosen, rejected,
                   args.histogram_bins)
    metrics = {"reward": stats, **report.to_dict(), "pair_strategy": args.pair_strategy, "min_margin": args.min_margin}
    print(format_report(metrics))
    if args.pair_strategy != "best_of_k" and not pairs:
        logger.warning("no pairs survived (all ties or below --min_margin); dpo_train.py will refuse an empty file")
    return metrics


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_report(metrics: dict) -> str:
    stats = metrics["reward"]
    lines = [
        f"rewards: {stats['responses']} responses over {stats.get('prompts', 0)} prompts",
        "  mean {mean:.4f}  std {std:.4f}  min {min:.4f}  p25 {p25:.4f}  median {median:.4f}  p75 {p75:.4f}  "
        "max {max:.4f}".format(**stats) if stats["responses"] else "  (none)",
        f"  mean within-prompt spread (max-min): {_num(stats.get('mean_spread'))}; prompts with all rewards tied: "
        f"{stats.get('all_tied_prompts')}",
        f"pairs ({metrics['pair_strategy']}, min_margin {metrics['min_margin']}): {metrics['pairs']} kept, dropped "
        f"{json.dumps(metrics['pairs_dropped'])}; mean margin {_num(metrics['mean_margin'])}",
        f"best-of-K SFT rows: {metrics['sft_rows']} kept, dropped {json.dumps(metrics['sft_dropped'])}",
    ]
    return "\n".join(lines)
