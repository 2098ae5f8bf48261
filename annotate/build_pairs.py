"""Build DPO pairs and best-of-K SFT rows from annotated generations (`get_rewards.py` does this too, in one go).

    python annotate/build_pairs.py --dataset_path OUT/annotated/rewards.jsonl --output_dir OUT/pairs_maxrandom \\
        --pair_strategy max_random --min_margin 0.1

Run it to try another strategy or margin without scoring again. Writes, in the stage's output dir:
    pairs.jsonl        canonical preference rows with `margin` (dpo_train.py --dataset_path reads it as is);
                       not written for --pair_strategy best_of_k
    sft.jsonl          `{"messages": prompt + best response, "id", "reward"}` (sft_train.py reads it as is)
    reward_hist.png    histogram of all rewards and of the chosen/rejected rewards of the pairs
    metrics.json       reward statistics and pair counts (ties and below-margin drops counted)
Strategies and tie rules: `rlhfkit/pairs.py`.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as `python annotate/build_pairs.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.errors import UserError, where
from rlhfkit.pairs import PAIR_STRATEGIES, build_pairs, reward_statistics

logger = logging.getLogger("build_pairs")

PAIRS_FILE, SFT_FILE, REWARDS_FILE, HISTOGRAM_FILE = "pairs.jsonl", "sft.jsonl", "rewards.jsonl", "reward_hist.png"


@dataclass
class PairArguments:
    pair_strategy: str = field(default="max_min", metadata={"help": "max_min | max_random | random | best_of_k (see rlhfkit/pairs.py)."})
    min_margin: float = field(default=0.0, metadata={"help": "Drop pairs (and best-of-K rows) whose reward margin is below this."})
    pair_seed: int = field(default=42, metadata={"help": "Seed of the random draws of max_random / random."})
    histogram_bins: int = field(default=40, metadata={"help": "Bins of reward_hist.png."})

    def __post_init__(self):
        if self.pair_strategy not in PAIR_STRATEGIES:
            raise ValueError(f"--pair_strategy must be one of {', '.join(PAIR_STRATEGIES)}, not '{self.pair_strategy}'")
        if self.min_margin < 0:
            raise ValueError("--min_margin must be ≥ 0")


@dataclass
class ScriptArguments:
    dataset_path: str = field(default=None, metadata={"help": "rewards.jsonl of get_rewards.py, or its output dir."})
    output_dir: str = field(default=None, metadata={"help": "Where pairs.jsonl, sft.jsonl and the histogram go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a complete --output_dir."})

    def __post_init__(self):
        if not self.dataset_path or not self.output_dir:
            raise ValueError("--dataset_path and --output_dir are required")


# ---------------------------------------------------------------------------------------------------------------
# reading rows
# ---------------------------------------------------------------------------------------------------------------
def resolve_stage_file(path: str, name: str, role: str) -> str:
    """`path` itself if a file; `path/name` if `path` is a complete stage dir (refusing unfinished ones)."""
    from rlhfkit.checkpoints import PARTIAL_SUFFIX, read_run_info

    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        info = read_run_info(path)
        if path.rstrip("/").endswith(PARTIAL_SUFFIX) or (info is not None and not info.get("complete")) or \
                os.path.exists(os.path.join(path, "INCOMPLETE")):
            raise UserError(f"{path}: {role} dir is incomplete (the run that wrote it did not finish)")
        if not os.path.isfile(os.path.join(path, name)):
            raise UserError(f"{path}: {role} dir has no {name}")
        return os.path.join(path, name)
    if os.path.isdir(path.rstrip("/") + PARTIAL_SUFFIX):
        raise UserError(f"{path}: does not exist; {path.rstrip('/')}{PARTIAL_SUFFIX} is an unfinished run (rerun it)")
    raise UserError(f"{path}: {role} file not found")


def validate_generation_row(row, path, number: int, need_rewards: bool = False) -> dict:
    """Check one generation (or annotated) row; return it with `id` as a string."""
    if not isinstance(row, dict):
        raise UserError(f"{where(path, number)}: a row must be an object")
    for key in ("prompt", "responses") + (("rewards",) if need_rewards else ()):
        if key not in row:
            raise UserError(f"{where(path, number, key)}: missing (expected a generate.py"
                            f"{'/get_rewards.py' if need_rewards else ''} row)")
    prompt = row["prompt"]
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
    return {**row, "id": str(row.get("id", number))}


def read_rows(path: str, need_rewards: bool) -> list[dict]:
    from rlhfkit.data import read_records

    rows = [validate_generation_row(row, path, n, need_rewards) for n, row in enumerate(read_records(path), start=1)]
    if not rows:
        raise UserError(f"{path}: no rows")
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        if row["id"] in seen:
            raise UserError(f"{where(path, number, 'id')}: '{row['id']}' repeats row {seen[row['id']]}")
        seen[row["id"]] = number
    return rows


# ---------------------------------------------------------------------------------------------------------------
# writing pairs, SFT rows, statistics, histogram
# ---------------------------------------------------------------------------------------------------------------
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
    from rlhfkit.data import write_jsonl_atomic

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


def main(args: ScriptArguments, pair_args: PairArguments) -> dict:
    # ---------------------------------------------------------------- setup
    from rlhfkit.checkpoints import StageOutput, fingerprint

    setup_logging()
    source = resolve_stage_file(args.dataset_path, REWARDS_FILE, "annotation")
    output = StageOutput(args.output_dir, "build_pairs", overwrite=args.overwrite_output_dir)

    # ---------------------------------------------------------------- data
    rows = read_rows(source, need_rewards=True)

    # ---------------------------------------------------------------- save
    metrics = write_pairs_and_stats(output.staging, rows, pair_args)
    run_info = {"dataset": {"paths": [os.path.abspath(source)], "fingerprint": fingerprint([r["id"] for r in rows])},
                "outputs": {"pairs": PAIRS_FILE if pair_args.pair_strategy != "best_of_k" else None,
                            "sft": SFT_FILE, "histogram": HISTOGRAM_FILE}}
    output.finalize(run_info, metrics, to_dict(args, pair_args))
    return metrics


if __name__ == "__main__":
    run_stage(main, (ScriptArguments, PairArguments))
