"""Merge the shards of a generation run (`generate.py --local_index i --world_size n`) and complete its output dir.

    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i python generation/generate.py ... --output_dir OUT/gen \\
        --local_index $i --world_size 4 & done; wait
    python generation/merge_data.py --output_dir OUT/gen --world_size 4 --dataset_path prompts.jsonl

Checks, each failing with one line: every shard finished; no prompt id written twice or outside its shard's
assignment; every assigned prompt written; all shards ran on the same prompt set; and, with `--dataset_path`, the
merged ids are exactly the ids of that prompt set (no gaps, nothing extra). Rows come out in prompt-set order, so
the merged file equals what one unsharded run writes. The merge holds the output lock (`OUT.partial/LOCK`, like every
other writer): a second merge of the same output is refused naming the first.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as `python generation/merge_data.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataclasses import dataclass, field

from rlhfkit.cli import run_stage, setup_logging
from rlhfkit.errors import UserError


@dataclass
class ScriptArguments:
    output_dir: str = field(default=None, metadata={"help": "The --output_dir the shards were generated into."})
    world_size: int = field(default=None, metadata={"help": "The --world_size the shards were generated with."})
    dataset_path: list[str] | None = field(
        default=None, metadata={"help": "Optional: the prompt set, to check the merged ids against it."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub prompt set."})
    max_prompts: int | None = field(default=None, metadata={"help": "As given to generate.py."})

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("--output_dir is required")
        if self.world_size is None or self.world_size < 1:
            raise ValueError("--world_size is required (≥ 1)")


ARGUMENTS = (ScriptArguments,)  # what main takes (CLI, YAML, tests)


def main(args: ScriptArguments) -> dict:
    # ---------------------------------------------------------------- setup
    from generation.generate import finalize
    from rlhfkit.checkpoints import PARTIAL_SUFFIX, StageOutput, read_run_info
    from rlhfkit.prompts import load_prompts

    setup_logging()
    staging = args.output_dir.rstrip("/") + PARTIAL_SUFFIX
    if not os.path.isdir(staging):
        info = read_run_info(args.output_dir) if os.path.isdir(args.output_dir) else None
        if info and info.get("complete"):
            raise UserError(f"{args.output_dir}: already merged and complete")
        raise UserError(f"{staging}: no shards to merge (run generate.py with --output_dir {args.output_dir})")

    # ---------------------------------------------------------------- data
    expected = None
    if args.dataset_path:
        expected = [row["id"] for row in load_prompts(args.dataset_path, split=args.dataset_split,
                                                       max_prompts=args.max_prompts)]

    # ---------------------------------------------------------------- save
    output = StageOutput(args.output_dir, "generate", resume=True)
    return finalize(output, args.world_size, expected)


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
