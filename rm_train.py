"""Reward-model training with the Bradley-Terry loss.

    accelerate launch rm_train.py --model_name_or_path <dir|built-in> --dataset_path pairs.jsonl --output_dir runs/rm

Features: any AutoModelForSequenceClassification backbone (causal LMs: Llama, Qwen, Gemma, GPT-2…; encoders: BERT,
DeBERTa…); full fine-tuning, LoRA or QLoRA (the reward head is trained and saved as a full module); every input
format of `rlhfkit.data`, several sources at once (`path:N` / `path:0.3`); margins; reward centering; prompt
truncation from the left instead of dropping long pairs (`--truncation left_prompt`, counted); an eval split
(`--validation_split_percentage` or `--eval_dataset_path`) with exact accuracy; multi-objective training
(`--objective multitask|more`, see rlhfkit/train/more.py); ZeRO-2/3 via configs/accelerate/*.yaml with complete weights
on save; `--resume_from_checkpoint true`.

Assumptions: one scalar reward per sequence, read at the last non-pad token (decoder LMs) or the pooled first token
(encoders); the pad token is made distinct from EOS (rlhfkit.models.ensure_pad_token). The output dir follows the
stage contract (rlhfkit/checkpoints.py); its run_info.json records `reward_stats` (mean/std of rewards on training
responses) for reward normalisation in PPO.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

from rlhfkit.args import ModelArguments, DataArguments, PairwiseArguments, TrainingDefaults
from trl import RewardConfig

from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.errors import UserError
from rlhfkit.tokenization import tokenize_pair

logger = logging.getLogger("rm_train")


@dataclass
class ScriptArguments(PairwiseArguments, DataArguments):
    truncation: str = field(
        default="left_prompt",
        metadata={"help": "Pairs longer than --max_length: 'left_prompt' cuts the prompt from the left and keeps both "
                  "responses whole; 'drop' drops the pair. Both are counted and reported."},
    )
    objective: str = field(default="bt", metadata={"help": "bt | multitask | more (multi-objective; needs a 'source' per row)."})
    alpha: float = field(default=0.99, metadata={"help": "MORE: weight of the current step's per-source head gradient "
                         "in its running average (1 = no momentum; see rlhfkit/train/more.py)."})
    normalize: str = field(default="l2", metadata={"help": "MORE: gradient normalisation before the min-norm solve: l2 | none."})
    more_weighting: str = field(default="reference", metadata={"help": "MORE: reference (the paper's code: losses "
                                "weighted by the min-norm λ) | inverse_norm (λ_k/‖g_k‖, see rlhfkit/train/more.py)."})
    reward_stats_samples: int = field(
        default=1000, metadata={"help": "Training pairs scored after training for run_info.json's reward mean/std."}
    )

    def __post_init__(self):
        DataArguments.__post_init__(self)
        PairwiseArguments.__post_init__(self)
        if self.truncation not in ("left_prompt", "drop"):
            raise ValueError(f"--truncation must be left_prompt or drop, not '{self.truncation}'")
        if self.objective not in ("bt", "multitask", "more"):
            raise ValueError(f"--objective must be bt, multitask or more, not '{self.objective}'")
        if self.normalize not in ("l2", "none"):
            raise ValueError(f"--normalize must be l2 or none, not '{self.normalize}'")
        if self.more_weighting not in ("reference", "inverse_norm"):
            raise ValueError(f"--more_weighting must be reference or inverse_norm, not '{self.more_weighting}'")


@dataclass
class RMArguments(TrainingDefaults, RewardConfig):
    """TRL's RewardConfig with this toolkit's defaults (rlhfkit.args.TrainingDefaults)."""

    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept off: the collators read our columns."})


def tokenize_rows(rows: list[dict], tokenizer, max_length: int | None, truncation: str, source_index: dict | None):
    """Pre-tokenised records for the trainer, plus counts of truncated and dropped pairs."""
    records, counts = [], {"pairs": len(rows), "truncated": 0}
    has_margin = any("margin" in row for row in rows)
    for row in rows:
        pair = tokenize_pair(tokenizer, row, max_length, truncation)
        if pair.dropped:
            counts[f"dropped_{pair.dropped}"] = counts.get(f"dropped_{pair.dropped}", 0) + 1
            continue
        counts["truncated"] += int(pair.truncated)
        record = {"chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids,
                  "length": max(len(pair.chosen_ids), len(pair.rejected_ids))}
        if has_margin:
            record["margin"] = float(row.get("margin", 0.0))
        if source_index is not None:
            record["source_index"] = source_index[row["source"]]
        records.append(record)
    counts["kept"] = len(records)
    return records, counts


ARGUMENTS = (ScriptArguments, ModelArguments, RMArguments)  # what main takes, in order (CLI, YAML, tests)


def main(script_args: ScriptArguments, model_args: ModelArguments, training_args: RMArguments) -> dict:
    # ---------------------------------------------------------------- setup
    import transformers
    from datasets import Dataset

    from rlhfkit.checkpoints import StageOutput, trainer_run_info
    from rlhfkit.saving import save_final_model
    from rlhfkit.data import load_train_eval
    from rlhfkit.faults import install_fault_handlers
    from rlhfkit.threads import follow_between_steps
    from rlhfkit.models import (ensure_pad_token, load_reward_model, load_tokenizer, peft_config, resolve_model,
                                reward_head_names)
    from rlhfkit.train.reward_trainer import RewardModelTrainer

    StageOutput.check_free(training_args.output_dir, model_args.overwrite_output_dir)
    setup_logging(training_args.process_index == 0)
    # seeded before the model is built: the new reward head's initialisation follows --seed, not the process history
    transformers.set_seed(training_args.seed)

    # ---------------------------------------------------------------- model & tokenizer
    model_path, model_record = resolve_model(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_path, model_args.chat_template, trust_remote_code=training_args.trust_remote_code)
    model = load_reward_model(model_path, model_args, new_head=True, trust_remote_code=training_args.trust_remote_code)
    pad_action = ensure_pad_token(tokenizer, model)
    lora = peft_config(model_args, "SEQ_CLS", modules_to_save=reward_head_names(model))

    # ---------------------------------------------------------------- data
    data, train_rows, eval_rows = load_train_eval(script_args, seed=training_args.seed)
    source_index = None
    if script_args.objective != "bt":
        sources = sorted({row["source"] for row in train_rows})
        source_index = {name: i for i, name in enumerate(sources)}
        eval_rows = [row for row in eval_rows if row["source"] in source_index]
    max_length = training_args.max_length
    train_records, train_counts = tokenize_rows(train_rows, tokenizer, max_length, script_args.truncation, source_index)
    eval_records, eval_counts = tokenize_rows(eval_rows, tokenizer, max_length, script_args.truncation, source_index)
    logger.info("tokenised (max_length=%s, truncation=%s): train %s; eval %s",
                max_length, script_args.truncation, train_counts, eval_counts)
    if not train_records:
        raise UserError(f"all {len(train_rows)} training pairs were dropped by --max_length {max_length}")
    train_dataset = Dataset.from_list(train_records)
    eval_dataset = Dataset.from_list(eval_records) if eval_records else None

    # ---------------------------------------------------------------- train
    # the staging dir appears only now, so bad input above leaves nothing behind
    output, resume_from = StageOutput.for_trainer(training_args, "rm", overwrite=model_args.overwrite_output_dir,
                                                  arguments=(script_args, model_args), dataset=train_rows,
                                                  model=model_path, tokenizer=tokenizer)  # a resume is this run
    trainer_cls, extra = RewardModelTrainer, {}
    pairwise = {"pairwise_forward": script_args.pairwise_forward,
                "max_tokens_per_batch": script_args.max_tokens_per_batch}
    if script_args.objective != "bt":
        # the per-source head gradients of rlhfkit/train/more.py read pooled features off TRL's padded rows
        if script_args.pairwise_forward not in ("auto", "padded"):
            logger.info("--objective %s runs the padded pairwise forward", script_args.objective)
        pairwise = {"pairwise_forward": "padded", "max_tokens_per_batch": None}
        from rlhfkit.train.more_trainer import trainer_class

        trainer_cls = trainer_class(script_args.objective)
        extra = {"alpha": script_args.alpha, "normalize": script_args.normalize, "source_names": list(source_index),
                 "more_weighting": script_args.more_weighting}
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora,
        center_coefficient=training_args.center_rewards_coefficient or 0.0,
        **pairwise,
        **extra,
    )
    install_fault_handlers(trainer, training_args)  # preemption → checkpoint + exit 75; non-finite loss → stop
    follow_between_steps(trainer)  # take the cores a finished partner stage left (RLHFKIT_THREADS_FILE)
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = {f"train_{k}" if not k.startswith("train") else k: v for k, v in train_result.metrics.items()}
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    stats_records = random.Random(training_args.seed).sample(
        train_records, min(script_args.reward_stats_samples, len(train_records)))
    trainer.eval_prefix = "reward_stats_"
    stats = trainer.evaluate(eval_dataset=Dataset.from_list(stats_records), metric_key_prefix="reward_stats")
    trainer.eval_prefix = "eval_"
    reward_stats = {"mean": stats["reward_stats_reward_mean"], "std": stats["reward_stats_reward_std"],
                    "pairs": len(stats_records)}
    if not all(math.isfinite(v) for v in (reward_stats["mean"], reward_stats["std"])):
        raise UserError("training diverged: non-finite rewards; lower --learning_rate")

    # ---------------------------------------------------------------- save
    save_final_model(trainer, output.staging, tokenizer, merge_lora=not model_args.save_adapter_only)
    args = to_dict(script_args, model_args, training_args)
    run_info = {
        **trainer_run_info(script_args, model_args, model_record, tokenizer, pad_action, train_rows, data.report,
                           tokenization={"train": train_counts, "eval": eval_counts}),
        "reward_stats": reward_stats,
        "objective": script_args.objective,
        "pairwise_forward": trainer.pairwise_layout,
    }
    metrics["reward_stats"] = reward_stats
    metrics["data"] = {"train": train_counts, "eval": eval_counts}
    output.finalize(run_info, metrics, args)
    return metrics


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
