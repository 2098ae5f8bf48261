"""Build DPO pairs and best-of-K SFT rows from annotated generations (`get_rewards.py` does this too, in one go).

    python annotate/build_pairs.py --dataset_path OUT/annotated/rewards.jsonl --output_dir OUT/pairs_maxrandom \\
        --pair_strategy max_random --min_margin 0.1

Run it to try another strategy or margin without scoring again. Writes, in the stage's output dir:
    pairs.jsonl        canonical preference rows with `margin` (dpo_train.py --dataset_path reads it as is);
                       not written for --pair_strategy best_of_k
    sft.jsonl          `{"messages": prompt + best response, "id", "reward"}` (sft_train.py reads it as is)
    reward_hist.png    histogram of all rewards and of the chosen/rejected rewards of the pairs
    metrics.json       reward statistics and pair counts (ties and below-margin drops counted)
Strategies and tie rules: `rlhfkit/pairs.py`; the file names, the row reader and the writing of these files:
`rlhfkit/generations.py` (shared with get_rewards.py).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as `python annotate/build_pairs.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import logging
from dataclasses import dataclass, field

from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.generations import (REWARDS_FILE, PairArguments, annotation_outputs, read_generations, resolve_stage_file,
                                 write_pairs_and_stats)

logger = logging.getLogger("build_pairs")


@dataclass
class ScriptArguments:
    dataset_path: str = field(default=None, metadata={"help": "rewards.jsonl of get_rewards.py, or its output dir."})
    output_dir: str = field(default=None, metadata={"help": "Where pairs.jsonl, sft.jsonl and the histogram go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a complete --output_dir."})

    def __post_init__(self):
        if not self.dataset_path or not self.output_dir:
            raise ValueError("--dataset_path and --output_dir are required")


ARGUMENTS = (ScriptArguments, PairArguments)  # what main takes, in order (CLI, YAML, tests)


def read_rows(path: str, need_rewards: bool) -> list[dict]:
    """Generation (or, `need_rewards`, annotated) rows: `rlhfkit.generations.read_generations`, by the name callers
    of this script have imported."""
    return read_generations(path, need_rewards)


def main(args: ScriptArguments, pair_args: PairArguments) -> dict:
    # ---------------------------------------------------------------- setup
    from rlhfkit.checkpoints import StageOutput, fingerprint

    setup_logging()
    source = resolve_stage_file(args.dataset_path, REWARDS_FILE, "annotation")
    output = StageOutput(args.output_dir, "build_pairs", overwrite=args.overwrite_output_dir)

    # ---------------------------------------------------------------- data
    rows = read_generations(source, need_rewards=True)

    # ---------------------------------------------------------------- save
    metrics = write_pairs_and_stats(output.staging, rows, pair_args)
    run_info = {"dataset": {"paths": [os.path.abspath(source)], "fingerprint": fingerprint([r["id"] for r in rows])},
                "outputs": annotation_outputs(pair_args.pair_strategy)}
    output.finalize(run_info, metrics, to_dict(args, pair_args))
    return metrics


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
