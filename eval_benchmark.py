"""Reward-model evaluation: RewardBench's exact scoring, or pairwise accuracy on any preference set.

    accelerate launch eval_benchmark.py --reward_name_or_path runs/rm --dataset_path reward-bench.jsonl --record_dir runs/rm-eval

Every pair of the set is scored (chosen and rejected, each rendered as prompt + response with the *reward model's*
chat template, tokenised once), in length-sorted batches; with several processes each pair is scored by exactly one
process. Rows with a RewardBench `subset` get RewardBench v1's scoring (rlhfkit/rewardbench.py: strict >, official
example-count weights, 4-section mean, legacy score with Prior); other sets get plain accuracy (per `subset` or
`source` when present). With `--ref_model_name_or_path`, `--reward_name_or_path` is a DPO policy and the score is its
implicit reward Σ log π(y|x) − Σ log π_ref(y|x) over response tokens.

Writes to --record_dir: results.json (everything), scores.jsonl (per pair), table.txt (what is printed),
metrics.json and args.yaml; each file written to a temp path and renamed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.errors import UserError

logger = logging.getLogger("eval_benchmark")


@dataclass
class ScriptArguments:
    reward_name_or_path: str = field(default=None, metadata={"help": "Reward model dir (rm_train.py output), a "
                                     "*ForSequenceClassification dir, or with --ref_model_name_or_path a DPO policy."})
    dataset_path: list[str] = field(default=None, metadata={"help": "Preference set(s): RewardBench rows or any "
                                    "format rlhfkit.data reads."})
    record_dir: str = field(default=None, metadata={"help": "Where results are written."})
    ref_model_name_or_path: str = field(default=None, metadata={"help": "Reference policy: switches to the DPO "
                                        "implicit reward."})
    dataset_split: str = field(default="train", metadata={"help": "Split for hub datasets (RewardBench: 'filtered')."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    max_length: int = field(default=None, metadata={"help": "Truncate longer conversations from the left "
                            "(default: no truncation, as RewardBench)."})
    chat_template: str = field(default=None, metadata={"help": "Template for a tokenizer without one."})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16."})
    skip_invalid_rows: bool = field(default=False, metadata={"help": "Skip (and count) malformed rows."})
    calibration: bool = field(default=True, metadata={"help": "Per-source accuracy, ECE and a reliability diagram."})

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, not '{self.dtype}'")
        if self.batch_size < 1:
            raise ValueError("--batch_size must be ≥ 1")


def _write(record_dir: Path, name: str, text: str) -> None:
    from rlhfkit.checkpoints import write_text_atomic

    write_text_atomic(record_dir / name, text)


def main(script_args: ScriptArguments) -> dict:
    # ---------------------------------------------------------------- setup
    import torch
    import yaml

    from rlhfkit.data import load_preferences
    from rlhfkit.distributed import new_accelerator
    from rlhfkit.models import (ensure_pad_token, load_causal_lm, load_reward_model, load_tokenizer, match_vocabulary,
                                resolve_model)
    from rlhfkit.rewardbench import format_table, is_correct, is_rewardbench, rewardbench_summary, subset_accuracies
    from rlhfkit.scoring import score_conversations, shard_and_gather

    for flag in ("reward_name_or_path", "dataset_path", "record_dir"):
        if not getattr(script_args, flag):
            raise UserError(f"--{flag} is required")
    accelerator = new_accelerator()
    setup_logging(accelerator.is_main_process)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[script_args.dtype]

    # ---------------------------------------------------------------- model & tokenizer
    model_path, model_record = resolve_model(script_args.reward_name_or_path, role="reward model")
    implicit = script_args.ref_model_name_or_path is not None
    tokenizer = load_tokenizer(model_path, script_args.chat_template)
    if implicit:
        ref_path, ref_record = resolve_model(script_args.ref_model_name_or_path, role="reference model")
        model = load_causal_lm(model_path, dtype=dtype).to(accelerator.device).eval()
        reference = load_causal_lm(ref_path, dtype=dtype).to(accelerator.device).eval()
        vocab_before_pad = model.get_input_embeddings().num_embeddings
        ensure_pad_token(tokenizer, model)
        match_vocabulary(reference, model, vocab_before_pad, script_args.ref_model_name_or_path)
        model_record["reference"] = ref_record
    else:
        model = load_reward_model(model_path, dtype=dtype).to(accelerator.device).eval()
        ensure_pad_token(tokenizer, model)

    # ---------------------------------------------------------------- data
    data = load_preferences(script_args.dataset_path, skip_invalid=script_args.skip_invalid_rows,
                            split=script_args.dataset_split)
    rows = data.rows
    if not rows:
        raise UserError(f"{script_args.dataset_path[0]}: no pairs to evaluate")
    conversations = [row["prompt"] + row["chosen"] for row in rows] + [row["prompt"] + row["rejected"] for row in rows]

    # ---------------------------------------------------------------- score
    if implicit:
        from rlhfkit.logprobs import implicit_rewards

        scores = shard_and_gather(
            lambda part: implicit_rewards(model, reference, tokenizer, part, script_args.batch_size),
            conversations, accelerator)
    else:
        scores = score_conversations(model, tokenizer, conversations, script_args.batch_size,
                                     script_args.max_length, progress=True, accelerator=accelerator)
    chosen_scores, rejected_scores = scores[: len(rows)], scores[len(rows):]
    correct = [is_correct(c, r) for c, r in zip(chosen_scores, rejected_scores)]
    subsets = [row.get("subset") for row in rows]
    rewardbench = is_rewardbench(subsets)
    if not any(subsets):
        sources = {row.get("source") for row in rows}
        subsets = [row.get("source") for row in rows] if len(sources) > 1 else [None] * len(rows)
    per_subset = subset_accuracies(subsets, correct)
    summary = rewardbench_summary(per_subset) if rewardbench else None

    # ---------------------------------------------------------------- save
    results = {
        "model": script_args.reward_name_or_path,
        "model_record": model_record,
        "scoring": "implicit_reward" if implicit else "reward_model",
        "datasets": script_args.dataset_path,
        "data_report": data.report,
        "pairs": len(rows),
        "processes": accelerator.num_processes,
        "accuracy": sum(correct) / len(correct),
        "ties": sum(c == r for c, r in zip(chosen_scores, rejected_scores)),
        "per_subset": per_subset,
        "rewardbench": summary,
    }
    if script_args.calibration and accelerator.is_main_process:
        try:
            from rlhfkit.calibration import calibration_report
        except ImportError:  # pragma: no cover - calibration ships with the toolkit
            calibration_report = None
        if calibration_report is not None:
            sources = [row.get("source") or row.get("subset") or "all" for row in rows]
            results["calibration"] = calibration_report(chosen_scores, rejected_scores, sources, script_args.record_dir)
    table = format_table(per_subset, summary)
    table += f"\n\n{'Accuracy (all pairs)':<28}{100 * results['accuracy']:>16.2f}   ({len(rows)} pairs, {results['ties']} ties)"
    if results.get("calibration"):
        calibration = results["calibration"]
        table += f"\n{'ECE (all pairs)':<28}{calibration['overall']['ece']:>16.4f}"
        if len(calibration["per_source"]) > 1:
            for name, stats in calibration["per_source"].items():
                table += f"\n  {name:<26}{stats['ece']:>16.4f}   accuracy {100 * stats['accuracy']:.2f}%"
    if accelerator.is_main_process:
        record_dir = Path(script_args.record_dir)
        record_dir.mkdir(parents=True, exist_ok=True)
        scores_lines = [
            json.dumps({"id": row.get("id", str(i)), "subset": row.get("subset"), "source": row.get("source"),
                        "chosen_score": c, "rejected_score": r, "correct": ok})
            for i, (row, c, r, ok) in enumerate(zip(rows, chosen_scores, rejected_scores, correct))
        ]
        _write(record_dir, "scores.jsonl", "\n".join(scores_lines) + "\n")
        _write(record_dir, "results.json", json.dumps(results, indent=2, default=str) + "\n")
        metrics = {"accuracy": results["accuracy"], "pairs": len(rows)}
        if summary:
            metrics.update({"score": summary["score"], "legacy_score": summary["legacy_score"], **summary["sections"]})
        _write(record_dir, "metrics.json", json.dumps(metrics, indent=2) + "\n")
        _write(record_dir, "args.yaml", yaml.safe_dump(to_dict(script_args), sort_keys=True))
        _write(record_dir, "table.txt", table + "\n")
        print(table)
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    run_stage(main, (ScriptArguments,))
