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

from rlhfkit.args import DataArguments, ModelArguments, check_pairwise_forward, pairwise_forward_field
from rlhfkit.cli import run_stage, setup_logging
from rlhfkit.errors import UserError
from rlhfkit.train.label_token_trainer import LabelTokenArguments

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
class PRMArguments(LabelTokenArguments):
    """HF TrainingArguments with this toolkit's defaults (rlhfkit.args.TrainingDefaults)."""

    max_length: int | None = field(default=2048, metadata={"help": "Longest row in tokens; steps ending beyond it "
                                   "are cut and counted."})


ARGUMENTS = (ScriptArguments, ModelArguments, PRMArguments)  # what main takes, in order (CLI, YAML, tests)


def main(script_args: ScriptArguments, model_args: ModelArguments, training_args: PRMArguments) -> dict:
    # ---------------------------------------------------------------- setup
    import transformers

    from rlhfkit.checkpoints import StageOutput, trainer_run_info
    from rlhfkit.data import train_eval_split
    from rlhfkit.models import load_trainable_causal_lm, resolve_causal_start
    from rlhfkit.process_reward import RUN_INFO_KEY, StepFormat, label_token_ids, load_step_rows, training_examples
    from rlhfkit.train.label_token_trainer import train_label_token_stage

    StageOutput.check_free(training_args.output_dir, model_args.overwrite_output_dir)
    setup_logging(training_args.process_index == 0)
    transformers.set_seed(training_args.seed)

    # ---------------------------------------------------------------- model & tokenizer
    trust = training_args.trust_remote_code
    model_path, model_record, tokenizer = resolve_causal_start(model_args, "a process reward model", trust)
    fmt = StepFormat(step_separator=script_args.step_separator)
    candidates = label_token_ids(tokenizer, fmt)  # before the model loads: a bad tokenizer fails fast
    model, pad_action = load_trainable_causal_lm(model_path, model_args, tokenizer, trust)

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

    # ---------------------------------------------------------------- train & save
    counts = {"train": train_counts, "eval": eval_counts}
    run_info = {**trainer_run_info(script_args, model_args, model_record, tokenizer, pad_action, train_rows, report,
                                  steps=counts),
                RUN_INFO_KEY: fmt.to_dict()}
    return train_label_token_stage(
        "prm", script_args, model_args, training_args, model=model, model_path=model_path, tokenizer=tokenizer,
        candidates=candidates, train_rows=train_rows, train_records=train_records, eval_records=eval_records,
        metric="steps", run_info=run_info, counts=counts)


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
