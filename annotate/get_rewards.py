"""Score every generated response with a reward model (or any labeler), then build DPO pairs and best-of-K SFT rows.

    python annotate/get_rewards.py --dataset_path OUT/gen --reward_model_path OUT/rm --output_dir OUT/annotated \\
        --pair_strategy max_min --min_margin 0.0
    python annotate/get_rewards.py --dataset_path OUT/gen --labeler my_pkg.judges:helpfulness ...

Output dir (stage contract): rewards.jsonl (each generate.py row plus `"rewards": [K floats]`), pairs.jsonl (DPO,
canonical schema with `margin`; not for best_of_k), sft.jsonl (best-of-K `{"messages"}` rows), reward_hist.png,
metrics.json (reward statistics, pair counts), args.yaml, run_info.json.

Features:
- Reward models from disk (`--reward_model_path`): each response is appended to its prompt as an assistant turn and
  the conversation is re-rendered with the *reward model's* tokenizer and chat template (never the policy's: they
  may differ), tokenized once (no double BOS), and scored in length-sorted batches (`rlhfkit.scoring`).
- `--labeler`: any scorer with the labeler interface (`rlhfkit.labelers`): a built-in name ("vader"), an RM dir,
  or an import path `module:function` / `file.py:function`, so rule-based and AI-feedback labels take this path.
- Several processes (`accelerate launch`): an RM scores a disjoint share of conversations per process; the main
  process writes the outputs.
- Pair building and statistics: annotate/build_pairs.py (rerun it alone to change the strategy).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as `python annotate/get_rewards.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import logging
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from rlhfkit.generations import (GENERATIONS_FILE, REWARDS_FILE, PairArguments, annotation_outputs, resolve_stage_file,
                                 write_pairs_and_stats)
from rlhfkit.generations import read_generations as read_rows
from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.errors import UserError

logger = logging.getLogger("get_rewards")


@dataclass
class ScriptArguments:
    dataset_path: str = field(default=None, metadata={"help": "generate.py output dir or its generations.jsonl."})
    reward_model_path: str | None = field(default=None, metadata={"help": "Reward model dir (rm_train.py output or any *ForSequenceClassification)."})
    labeler: str | None = field(
        default=None, metadata={"help": "Instead of an RM: 'vader', an RM dir, or 'module:function' / 'file.py:function'."}
    )
    output_dir: str = field(default=None, metadata={"help": "Where rewards.jsonl, pairs.jsonl, sft.jsonl go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a complete --output_dir."})
    batch_size: int = field(default=8, metadata={"help": "Conversations per reward-model forward pass."})
    max_length: int | None = field(
        default=None, metadata={"help": "RM: cut longer conversations from the left (the response is kept)."}
    )
    chunk_size: int = field(default=1024, metadata={"help": "Responses handed to the labeler per call (progress granularity)."})
    chat_template: str | None = field(default=None, metadata={"help": "RM chat template if its tokenizer has none."})
    tournament: str = field(default="round_robin", metadata={"help": "A pairwise preference model (pm_train.py) as "
                            "--labeler ranks each prompt's K responses: round_robin (every pair, both orders; reward "
                            "= wins + 0.5·ties) | knockout (K−1 comparisons; reward = rounds won). See "
                            "rlhfkit/preference_model.py."})

    def __post_init__(self):
        if not self.dataset_path or not self.output_dir:
            raise ValueError("--dataset_path and --output_dir are required")
        if bool(self.reward_model_path) == bool(self.labeler):
            raise ValueError("give exactly one of --reward_model_path and --labeler")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("--batch_size and --chunk_size must be ≥ 1")
        if self.tournament not in ("round_robin", "knockout"):
            raise ValueError(f"--tournament must be round_robin or knockout, not '{self.tournament}'")


ARGUMENTS = (ScriptArguments, PairArguments)  # what main takes, in order (CLI, YAML, tests)


def score_rows(rows: list[dict], labeler, chunk_size: int, show_progress: bool = True) -> list[list[float]]:
    """Rewards per row, one per response, from `labeler(prompts, responses)` called on chunks of responses."""
    flat = [(index, response) for index, row in enumerate(rows) for response in row["responses"]]
    # chunks end at row boundaries: a labeler that compares a prompt's responses (a preference model's tournament)
    # must see all of them in one call
    chunks, current = [], []
    for index, row in enumerate(rows):
        current.extend((index, response) for response in row["responses"])
        if len(current) >= chunk_size:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    scores: list[float] = []
    for chunk in tqdm(chunks, desc="scoring", disable=not show_progress):
        scores.extend(labeler([rows[i]["prompt"] for i, _ in chunk], [response for _, response in chunk]))
    if len(scores) != len(flat):
        raise UserError(f"labeler returned {len(scores)} scores for {len(flat)} responses")
    rewards, position = [], 0
    for row in rows:
        rewards.append([float(s) for s in scores[position : position + len(row["responses"])]])
        position += len(row["responses"])
    return rewards


def main(args: ScriptArguments, pair_args: PairArguments) -> dict:
    # ---------------------------------------------------------------- setup
    from rlhfkit.distributed import partial_state

    from rlhfkit.checkpoints import StageOutput, fingerprint, read_run_info
    from rlhfkit.files import write_jsonl_atomic
    from rlhfkit.labelers import load_labeler
    from rlhfkit.scoring import RewardModelScorer

    state = partial_state()
    setup_logging(state.is_main_process)
    source = resolve_stage_file(args.dataset_path, GENERATIONS_FILE, "generation")
    output = StageOutput(args.output_dir, "annotate", overwrite=args.overwrite_output_dir)

    # ---------------------------------------------------------------- model & labeler
    from rlhfkit.preference_model import is_preference_model

    if args.reward_model_path and is_preference_model(args.reward_model_path):
        args.labeler, args.reward_model_path = args.reward_model_path, None  # a PM is a labeler, not a scalar RM
    if args.reward_model_path:
        labeler = RewardModelScorer(args.reward_model_path, args.batch_size, args.max_length, state.device,
                                    chat_template=args.chat_template,
                                    accelerator=state if state.num_processes > 1 else None, progress=False)
    else:
        labeler = load_labeler(args.labeler, tournament=args.tournament, batch_size=args.batch_size,
                               max_length=args.max_length, device=state.device)
    logger.info("scoring with %s", labeler.info)

    # ---------------------------------------------------------------- data
    rows = read_rows(source, need_rewards=False)
    logger.info("%s: %d prompts, %d responses", source, len(rows), sum(len(r["responses"]) for r in rows))

    # ---------------------------------------------------------------- score
    rewards = score_rows(rows, labeler, args.chunk_size, state.is_main_process)

    # ---------------------------------------------------------------- save
    if not state.is_main_process:
        state.wait_for_everyone()
        return {}  # the main process writes the outputs and returns the metrics
    annotated = [{**row, "rewards": row_rewards} for row, row_rewards in zip(rows, rewards)]
    write_jsonl_atomic(output.staging / REWARDS_FILE, annotated)
    metrics = write_pairs_and_stats(output.staging, annotated, pair_args)
    parent_dir = os.path.dirname(os.path.abspath(source))
    parent_info = read_run_info(parent_dir) or {}
    run_info = {
        "parent": {"path": parent_dir, "stage": parent_info.get("stage")},
        "labeler": labeler.info,
        "dataset": {"paths": [os.path.abspath(source)], "fingerprint": fingerprint([r["id"] for r in rows])},
        "reward_stats": {"mean": metrics["reward"].get("mean"), "std": metrics["reward"].get("std")},
        "outputs": {"rewards": REWARDS_FILE, **annotation_outputs(pair_args.pair_strategy)},
    }
    output.finalize(run_info, metrics, to_dict(args, pair_args))
    return metrics


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
