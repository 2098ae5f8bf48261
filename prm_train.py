"""Process reward model (PRM) training: a causal LM that scores each reasoning step with "+" or "-".

    accelerate launch prm_train.py --model_name_or_path <dir|built-in> --dataset_path steps.jsonl --output_dir runs/prm

As RLHFlow's math-rm and TRL's PRMTrainer (rlhfkit/process_reward.py cites the files): the prompt under the model's
chat template, then each step followed by `--step_separator`; the label token ("+" correct, "-" wrong) is trained
at the last token of each step's separator, with the language-model loss there and nowhere else.

Features: step-labelled rows in TRL's stepwise layout (`prompt, completions, labels`), Math-Shepherd's (`input`,
`label` with "ки" tags) and PRM800K's (`question`, `label.steps`), read as published and detected per row; a bad row
is one line naming file, row and field; several files, a validation split or `--eval_dataset_path`; full
fine-tuning or LoRA (merged on save unless `--save_adapter_only`); ZeRO-2/3 via configs/accelerate/*.yaml with
complete weights on save; `--resume_from_checkpoint true`; preemption and non-finite-loss handling.

Assumptions: a causal LM whose tokenizer encodes "+" and "-" as one token each; no step contains the separator;
steps that end beyond `--max_length` are cut (labels dropped, counted), a row whose first step does not fit is dropped.

Output: a normal causal-LM checkpoint (stage contract); run_info.json holds the step format under
`process_reward_model`, which eval_benchmark.py (`--benchmark prm`), annotate/get_rewards.py (`--labeler`) and
ppo_train.py (`--reward_model_type prm`) read; metrics.json has `eval_step_accuracy` and the negative-step F1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import TrainingArguments

from rlhfkit.args import DataArguments, ModelArguments, TrainingDefaults, check_pairwise_forward, pairwise_forward_field
from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.errors import UserError

logger = logging.getLogger("prm_train")


@dataclass
class ScriptArguments(DataArguments):
    step_separator: str = field(default="\n", metadata={"help": "Text after every step (TRL's default, a newline); "
                                "the score of a step is read at its last token."})
    pairwise_forward: str = pairwise_forward_field()

    def __post_init__(self):
        DataArguments.__post_init__(self)
        if not self.step_separator:
            raise ValueError("--step_separator must not be empty")
        check_pairwise_forward(self.pairwise_forward)


@dataclass
class PRMArguments(TrainingDefaults, TrainingArguments):
    """HF TrainingArguments with this toolkit's defaults (rlhfkit.args.TrainingDefaults)."""

    max_length: int | None = field(default=2048, metadata={"help": "Longest row in tokens; steps ending beyond it "
                                   "are cut and counted."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept off: the collator reads our columns."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint (as TRL's configs)."})


ARGUMENTS = (ScriptArguments, ModelArguments, PRMArguments)  # what main takes, in order (CLI, YAML, tests)


def main(script_args: ScriptArguments, model_args: ModelArguments, training_args: PRMArguments) -> dict:
    # ---------------------------------------------------------------- setup
    import transformers
    from datasets import Dataset

    from rlhfkit.checkpoints import StageOutput, trainer_run_info
    from rlhfkit.saving import save_final_model
    from rlhfkit.data import train_eval_split
    from rlhfkit.faults import install_fault_handlers
    from rlhfkit.models import ensure_pad_token, load_causal_lm, load_tokenizer, peft_config, resolve_model
    from rlhfkit.process_reward import RUN_INFO_KEY, StepFormat, label_token_ids, load_step_rows, training_examples
    from rlhfkit.train.label_token_trainer import LabelTokenTrainer

    StageOutput.check_free(training_args.output_dir, model_args.overwrite_output_dir)
    setup_logging(training_args.process_index == 0)
    transformers.set_seed(training_args.seed)

    # ---------------------------------------------------------------- model & tokenizer
    model_path, model_record = resolve_model(model_args.model_name_or_path)
    if model_record.get("parent_stage") == "rm":
        raise UserError(f"{model_args.model_name_or_path}: is a reward model (stage 'rm'); a process reward model "
                        "starts from a causal LM")
    tokenizer = load_tokenizer(model_path, model_args.chat_template, trust_remote_code=training_args.trust_remote_code)
    fmt = StepFormat(step_separator=script_args.step_separator)
    candidates = label_token_ids(tokenizer, fmt)
    model = load_causal_lm(model_path, model_args, trust_remote_code=training_args.trust_remote_code)
    pad_action = ensure_pad_token(tokenizer, model)
    lora = peft_config(model_args, "CAUSAL_LM")
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)

    # ---------------------------------------------------------------- data
    rows, report = load_step_rows(script_args.dataset_path, script_args.dataset_split, script_args.skip_invalid_rows)
    if script_args.eval_dataset_path:
        train_rows = rows
        eval_rows, _ = load_step_rows(script_args.eval_dataset_path, script_args.dataset_split,
                                      script_args.skip_invalid_rows)
    else:
        train_rows, eval_rows = train_eval_split(rows, script_args.validation_split_percentage, training_args.seed)
    max_length = training_args.max_length
    train_records, train_counts = training_examples(train_rows, tokenizer, fmt, max_length)
    eval_records, eval_counts = training_examples(eval_rows, tokenizer, fmt, max_length)
    logger.info("step rows (max_length=%s): train %s; eval %s", max_length, train_counts, eval_counts)
    if not train_records:
        raise UserError(f"all {len(train_rows)} training rows are longer than --max_length {max_length}")
    train_dataset = Dataset.from_list(train_records)
    eval_dataset = Dataset.from_list(eval_records) if eval_records else None

    # ---------------------------------------------------------------- train
    # the staging dir appears only now, so bad input above leaves nothing behind
    output, resume_from = StageOutput.for_trainer(training_args, "prm", overwrite=model_args.overwrite_output_dir)
    # "before training" is measured inside train() (eval_on_start), not by an evaluate() ahead of it: under ZeRO-3
    # that leaves HF's Trainer holding an inference engine and no training engine (backward on None)
    measure_start = eval_dataset is not None and resume_from is None
    training_args.eval_on_start = training_args.eval_on_start or measure_start
    trainer = LabelTokenTrainer(model=model, args=training_args, train_dataset=train_dataset,
                                eval_dataset=eval_dataset, processing_class=tokenizer, candidates=candidates,
                                metric="steps", pairwise_forward=script_args.pairwise_forward)
    install_fault_handlers(trainer, training_args)  # preemption → checkpoint + exit 75; non-finite loss → stop
    metrics: dict = {}
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    if measure_start:  # the step-0 evaluation of eval_on_start
        start = next(entry for entry in trainer.state.log_history if "eval_loss" in entry)
        metrics.update({f"{k}_before": v for k, v in start.items() if k in ("eval_loss", "eval_step_accuracy", "eval_negative_f1")})
    metrics.update({f"train_{k}" if not k.startswith("train") else k: v for k, v in train_result.metrics.items()})
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())

    # ---------------------------------------------------------------- save
    save_final_model(trainer, output.staging, tokenizer, merge_lora=not model_args.save_adapter_only)
    args = to_dict(script_args, model_args, training_args)
    run_info = {
        **trainer_run_info(script_args, model_args, model_record, tokenizer, pad_action, train_rows, report,
                           steps={"train": train_counts, "eval": eval_counts}),
        RUN_INFO_KEY: fmt.to_dict(),
        "label_token_ids": candidates,
        "pairwise_forward": trainer.pairwise_layout,
    }
    metrics["data"] = {"train": train_counts, "eval": eval_counts}
    output.finalize(run_info, metrics, args)
    return metrics


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
