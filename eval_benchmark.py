"""Reward-model evaluation: RewardBench v1 and 2, RM-Bench, RMB and JudgeBench exactly as their own code scores them,
or pairwise accuracy on any preference set; with reward-model diagnostics in every run.

    accelerate launch eval_benchmark.py --reward_model_path runs/rm --dataset_path reward-bench.jsonl --output_dir runs/rm-eval
    accelerate launch eval_benchmark.py --reward_model_path runs/rm --benchmark all --dataset_path benchmarks/ \
        --output_dir runs/rm-eval        # every benchmark file found under benchmarks/, one summary table

What is scored, and how (`--benchmark auto` detects it from the rows; or name it):
- v1 (rows `prompt, chosen, rejected, subset, id` with RewardBench subsets): every row is scored, identical and
  empty responses included (counted in the output); strict >, EXAMPLE_COUNTS weights, 4-section mean, legacy score
  with Prior; conversations longer than `--max_length` (2048, RewardBench's default) keep their last tokens and the
  tokenizer's own special tokens, as scripts/run_rm.py truncates (rlhfkit/eval/rewardbench.py says exactly what is
  RewardBench and what is not).
- v2 (rows `id, prompt, chosen [list], rejected [list], num_correct, total_completions, subset`): every completion is
  scored; best-of-N with tie credit per row, the weighted Ties score, the mean of six subsets
  (rlhfkit/eval/rewardbench2.py); truncation on the tokenizer's own side, as scripts/run_v2.py.
- rm-bench (RM-Bench's `total_dataset.json` or `<domain>_filtered.json`: `id, prompt, chosen [3], rejected [3],
  domain`): the six responses of a prompt scored together; the 3×3 chosen-style × rejected-style accuracy matrix per
  domain, Easy / Normal / Hard, Chat / Math / Code / Safety and their mean, as scripts/utils.py compute_accuracy
  (rlhfkit/eval/rmbench.py); truncation as v1 (its run_rm.py is RewardBench's).
- rmb (RMB's `RMB_dataset/` tree: pairwise `pair_uid, conversation_input, chosen, reject, category_path` and best-of-N
  `bon_uid, conversation_input, bon_best, loser_list, category_path` rows): pairwise accuracy and best-of-N accuracy
  (the best answer above every loser) pooled per section, the mean of the four sections (rlhfkit/eval/rmb.py);
  truncation as v1 (eval/scripts/my_run_rm.py).
- judgebench (JudgeBench's `data/*.jsonl`: `pair_id, source, question, response_A, response_B, label`): a pair is
  right when the correct response scores strictly higher, judged in both orders as run_judge.py does (a tie is
  wrong); Knowledge / Reasoning / Math / Coding / Overall (rlhfkit/eval/judgebench.py); untruncated, as its
  reward-model judges (only the model's own position limit applies, unless --max_length is given).
- pairs (any format rlhfkit.data reads): plain strict accuracy (per `subset` or `source` when present); rows are
  loaded by `load_preferences` (pairs with chosen == rejected are dropped and counted there); same truncation as v1.
- all: every file under --dataset_path (directories searched) is detected as one of the benchmarks above and scored
  into --output_dir/<benchmark>/ (table.txt, results.json, scores.jsonl, metrics.json) with the model loaded once;
  --output_dir/table.txt is one summary table. RM-Bench's per-domain files beside its total_dataset.json are
  skipped (the same rows); each JudgeBench file is its own run (run_judge.py scores one file at a time); files that
  are no benchmark are listed and skipped.
- With `--ref_model_path` (or `--ref_free true`), `--reward_model_path` is a DPO policy scored as
  rewardbench/dpo.py does (its tokenization and truncation: 2048 tokens, prompts cut to their last 128; the score is
  Σ log π − Σ log π_ref over response tokens, or `--ref_free_type` avg|sum|norm of log π alone), in pairs as the
  benchmark compares them (RM-Bench: chosen[k] with rejected[k], as its run_dpo.py). RewardBench 2 has no DPO mode,
  and neither do we.
Extra, in every run: the length is capped at the model's own position limit (counted, reported; the official scripts
would crash there), the Spearman correlation of reward with response length in tokens, accuracy when the better
response is the longer vs the shorter one, a batch-invariance check (a sample of rows rescored at batch size 1), and
the ECE of σ(r_better − r_worse) with a reliability diagram (rlhfkit/eval/calibration.py, rlhfkit/eval/diagnostics.py).

The responses to one prompt go through the pairwise forward together (rlhfkit/pairwise.py: the prompt computed
once); in length-sorted batches; with several processes each sequence is scored by exactly one process.
Writes --output_dir as every stage does (`OUT.partial/` renamed to `OUT/`, rlhfkit/checkpoints.py): results.json
(everything), scores.jsonl (per row), table.txt (what is printed), metrics.json, args.yaml, run_info.json.
(The flags renamed in 0.1 still work, with a note: rlhfkit.cli.RENAMED_FLAGS.)

Where things live: one module per benchmark (rlhfkit/eval/benchmarks.py lists them and says what each holds), one
per model kind (rlhfkit/eval/scorers.py); this script only wires them together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.errors import UserError
from rlhfkit.eval.benchmarks import CHOICES

logger = logging.getLogger("eval_benchmark")


@dataclass
class ScriptArguments:
    reward_model_path: str = field(default=None, metadata={"help": "Reward model dir (rm_train.py output), a "
                                     "*ForSequenceClassification dir, or with --ref_model_path / --ref_free "
                                     "a DPO policy."})
    dataset_path: list[str] = field(default=None, metadata={"help": "Benchmark files or directories (RewardBench v1 / "
                                    "v2, RM-Bench, RMB, JudgeBench, as published), or any preference format "
                                    "rlhfkit.data reads; with --benchmark all, directories to search."})
    output_dir: str = field(default=None, metadata={"help": "Where results are written (OUT.partial/, renamed)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a complete --output_dir."})
    benchmark: str = field(default="auto", metadata={"help": "auto | v1 | v2 | rm-bench | rmb | judgebench | pairs | "
                           "all: how rows are read and scored (auto: detected from the rows; all: every benchmark "
                           "file under --dataset_path, one summary table)."})
    ref_model_path: str = field(default=None, metadata={"help": "Reference policy: switches to the DPO "
                                        "implicit reward (rewardbench/dpo.py)."})
    ref_free: bool = field(default=False, metadata={"help": "Score a DPO policy without a reference, as RewardBench's "
                           "run_dpo.py without --ref_model."})
    ref_free_type: str = field(default="avg", metadata={"help": "Reference-free reduction of the response log-probs: "
                               "avg (RewardBench's default) | sum | norm."})
    dataset_split: str = field(default="train", metadata={"help": "Split for hub datasets (RewardBench: 'filtered'; "
                               "RewardBench 2: 'test'; RM-Bench: 'train'; JudgeBench: 'gpt' or 'claude')."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    pairwise_forward: str = field(default="auto", metadata={"help": "prefix_shared | packed | padded | auto: how "
                                  "the responses to one prompt are laid out (rlhfkit/pairwise.py); every layout "
                                  "gives the same scores, auto the fastest."})
    max_length: int = field(default=None, metadata={"help": "Truncate longer sequences as the benchmark's own script "
                            "does (default: 2048, as RewardBench, RM-Bench, RMB and DPO scoring; none for "
                            "JudgeBench); never beyond the model's own position limit."})
    chat_template: str = field(default=None, metadata={"help": "Template for a tokenizer without one."})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16."})
    skip_invalid_rows: bool = field(default=False, metadata={"help": "Skip (and count) malformed rows."})
    calibration: bool = field(default=True, metadata={"help": "Per-source accuracy, ECE and a reliability diagram."})
    batch_invariance_rows: int = field(default=16, metadata={"help": "Rows rescored at batch size 1 to check that "
                                       "batching does not change scores (0: skip)."})
    aggregate: str = field(default="min", metadata={"help": "A process reward model (prm_train.py): how step scores "
                           "make a response's score for best-of-N: min | last | prod | mean (rlhfkit/eval/prm.py)."})
    num_n: int = field(default=None, metadata={"help": "A process reward model's best-of-N: the first N answers."})

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, not '{self.dtype}'")
        if self.batch_size < 1:
            raise ValueError("--batch_size must be ≥ 1")
        if self.benchmark not in CHOICES:
            raise ValueError(f"--benchmark must be one of {', '.join(CHOICES)}, not '{self.benchmark}'")
        from rlhfkit.eval.dpo_scoring import REF_FREE_TYPES

        if self.ref_free_type not in REF_FREE_TYPES:
            raise ValueError(f"--ref_free_type must be one of {', '.join(REF_FREE_TYPES)}, not '{self.ref_free_type}'")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError("--max_length must be ≥ 2")
        if self.ref_free and self.ref_model_path:
            raise ValueError("--ref_free true and --ref_model_path exclude each other")
        if self.batch_invariance_rows < 0:
            raise ValueError("--batch_invariance_rows must be ≥ 0")



ARGUMENTS = (ScriptArguments,)  # what main takes (CLI, YAML, tests)


def main(script_args: ScriptArguments) -> dict:
    # ---------------------------------------------------------------- setup
    from rlhfkit.checkpoints import StageOutput, parent_from_model
    from rlhfkit.distributed import new_accelerator
    from rlhfkit.eval import benchmarks, scorers
    from rlhfkit.pairwise import PAIRWISE_FORWARDS

    if script_args.pairwise_forward not in PAIRWISE_FORWARDS:
        raise UserError(f"--pairwise_forward must be one of {', '.join(PAIRWISE_FORWARDS)}, "
                        f"not '{script_args.pairwise_forward}'")
    for flag in ("reward_model_path", "dataset_path", "output_dir"):
        if not getattr(script_args, flag):
            raise UserError(f"--{flag} is required")
    StageOutput.check_free(script_args.output_dir, script_args.overwrite_output_dir)
    accelerator = new_accelerator()
    setup_logging(accelerator.is_main_process)

    # ---------------------------------------------------------------- model & tokenizer (once for every benchmark)
    scorer = scorers.load(script_args, accelerator)  # a PRM, a pairwise PM, a reward model or a DPO policy

    # ---------------------------------------------------------------- data (which benchmarks, from which files)
    runs, skipped = scorer.runs(script_args)

    # ---------------------------------------------------------------- evaluate
    # the staging dir appears only now, so bad flags or files above leave nothing behind
    output = StageOutput(script_args.output_dir, "eval_benchmark", overwrite=script_args.overwrite_output_dir)
    several = script_args.benchmark == "all"
    results = {}
    for run in runs:
        logger.info("scoring %s (%d file(s))", run["name"], len(run["paths"]))
        results[run["name"]] = scorer.evaluate(run, output.staging / run["name"] if several else output.staging)

    # ---------------------------------------------------------------- save
    if several:
        summary = benchmarks.summary_rows(runs, results, Path(script_args.output_dir))
        metrics = {row["name"]: row["score"] for row in summary}
        results = {"model": script_args.reward_model_path, "model_record": scorer.record, "benchmark": "all",
                   "datasets": script_args.dataset_path, "summary": summary, "skipped_files": skipped,
                   "results": results}
        if accelerator.is_main_process:
            table = benchmarks.format_summary(summary, skipped)
            write_summary(output.staging, results, table)
    else:
        results = results[runs[0]["name"]]
        metrics = results.pop("metrics")
    run_info = {"parent": parent_from_model(scorer.record), "model": scorer.record, "benchmarks": runs,
                "skipped_files": skipped}
    output.finalize(run_info, metrics, to_dict(script_args))
    return results


def write_summary(directory: Path, results: dict, table: str) -> None:
    import json

    from rlhfkit.files import write_text_atomic

    write_text_atomic(directory / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    write_text_atomic(directory / "table.txt", table + "\n")
    print(table)


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
