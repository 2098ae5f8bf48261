"""Pairwise preference model (PM) training: a causal LM fine-tuned to answer which of two responses is better.

    accelerate launch pm_train.py --model_name_or_path <dir|built-in> --dataset_path pairs.jsonl --output_dir runs/pm

As RLHFlow's pair-pm (rlhfkit/preference_model.py cites the files): each pair becomes the comparison
`[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \\n` as one user turn under the model's chat
template, answered by one token, "A" or "B". Every pair is trained in both orders ((chosen, rejected) → "A",
(rejected, chosen) → "B"), so position bias has nothing to learn from; the two orders share their prefix in the
pairwise forward. Loss on the answer token only.

Features: the preference files and formats rm_train.py reads (`rlhfkit.data.load_preferences`: `path:N`, several
sources, validation split or `--eval_dataset_path`); full fine-tuning or LoRA (merged on save unless
`--save_adapter_only`); ZeRO-2/3 via configs/accelerate/*.yaml with complete weights on save; `--resume_from_checkpoint
true`; preemption and non-finite-loss handling as every Trainer stage.

Assumptions: a causal LM (a PM is not a sequence classifier: the answer is a token of its vocabulary), whose
tokenizer encodes "A" and "B" as one token each; pairs whose comparison is longer than `--max_length` are dropped
and counted (cutting inside a response changes what is compared).

Output: a normal causal-LM checkpoint (stage contract, rlhfkit/checkpoints.py); run_info.json holds the template
under `preference_model`, which eval_benchmark.py, annotate/get_rewards.py and ppo_train.py read to use it;
metrics.json has `eval_accuracy` (pairs whose mean two-order P(chosen) > 0.5) and `eval_order_agreement`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import TrainingArguments

from rlhfkit.args import DataArguments, ModelArguments, TrainingDefaults, check_pairwise_forward, pairwise_forward_field
from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.errors import UserError

logger = logging.getLogger("pm_train")


@dataclass
class ScriptArguments(DataArguments):
    template: str | None = field(
        default=None,
        metadata={"help": "The comparison template (a string with {context}, {response_A}, {response_B}); default: "
                  "RLHFlow pair-pm's '[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \\n'."},
    )
    pairwise_forward: str = pairwise_forward_field()

    def __post_init__(self):
        DataArguments.__post_init__(self)
        check_pairwise_forward(self.pairwise_forward)


@dataclass
class PMArguments(TrainingDefaults, TrainingArguments):
    """HF TrainingArguments with this toolkit's defaults (rlhfkit.args.TrainingDefaults)."""

    max_length: int | None = field(default=2048, metadata={"help": "Longest comparison (both responses, the "
                                   "context and the template) in tokens; longer pairs are dropped and counted."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept off: the collator reads our columns."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint (as TRL's configs)."})


ARGUMENTS = (ScriptArguments, ModelArguments, PMArguments)  # what main takes, in order (CLI, YAML, tests)


def main(script_args: ScriptArguments, model_args: ModelArguments, training_args: PMArguments) -> dict:
    # ---------------------------------------------------------------- setup
    import transformers
    from datasets import Dataset

    from rlhfkit.checkpoints import StageOutput, trainer_run_info
    from rlhfkit.saving import save_final_model
    from rlhfkit.data import load_train_eval
    from rlhfkit.faults import install_fault_handlers
    from rlhfkit.models import ensure_pad_token, load_causal_lm, load_tokenizer, peft_config, resolve_model
    from rlhfkit.preference_model import RUN_INFO_KEY, PairTemplate, label_token_ids, training_examples
    from rlhfkit.train.label_token_trainer import LabelTokenTrainer

    StageOutput.check_free(training_args.output_dir, model_args.overwrite_output_dir)
    setup_logging(training_args.process_index == 0)
    transformers.set_seed(training_args.seed)

    # ---------------------------------------------------------------- model & tokenizer
    model_path, model_record = resolve_model(model_args.model_name_or_path)
    if model_record.get("parent_stage") == "rm":
        raise UserError(f"{model_args.model_name_or_path}: is a reward model (stage 'rm'); a preference model starts "
                        "from a causal LM")
    tokenizer = load_tokenizer(model_path, model_args.chat_template, trust_remote_code=training_args.trust_remote_code)
    template = PairTemplate(**({"template": script_args.template} if script_args.template else {}))
    template = PairTemplate.from_dict(template.to_dict(), where="--template")  # the same checks as on reload
    candidates = label_token_ids(tokenizer, template)
    model = load_causal_lm(model_path, model_args, trust_remote_code=training_args.trust_remote_code)
    pad_action = ensure_pad_token(tokenizer, model)
    lora = peft_config(model_args, "CAUSAL_LM")
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)

    # ---------------------------------------------------------------- data
    data, train_rows, eval_rows = load_train_eval(script_args, seed=training_args.seed)
    max_length = training_args.max_length
    train_records, train_counts = training_examples(train_rows, tokenizer, template, max_length)
    eval_records, eval_counts = training_examples(eval_rows, tokenizer, template, max_length)
    logger.info("comparisons (both orders per pair, max_length=%s): train %s; eval %s",
                max_length, train_counts, eval_counts)
    if not train_records:
        raise UserError(f"all {len(train_rows)} training pairs are longer than --max_length {max_length}")
    train_dataset = Dataset.from_list(train_records)
    eval_dataset = Dataset.from_list(eval_records) if eval_records else None

    # ---------------------------------------------------------------- train
    # the staging dir appears only now, so bad input above leaves nothing behind
    output, resume_from = StageOutput.for_trainer(training_args, "pm", overwrite=model_args.overwrite_output_dir)
    # "before training" is measured inside train() (eval_on_start), not by an evaluate() ahead of it: under ZeRO-3
    # that leaves HF's Trainer holding an inference engine and no training engine (backward on None)
    measure_start = eval_dataset is not None and resume_from is None
    training_args.eval_on_start = training_args.eval_on_start or measure_start
    trainer = LabelTokenTrainer(model=model, args=training_args, train_dataset=train_dataset,
                                eval_dataset=eval_dataset, processing_class=tokenizer, candidates=candidates,
                                metric="pairs", pairwise_forward=script_args.pairwise_forward)
    install_fault_handlers(trainer, training_args)  # preemption → checkpoint + exit 75; non-finite loss → stop
    metrics: dict = {}
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    if measure_start:  # the step-0 evaluation of eval_on_start
        start = next(entry for entry in trainer.state.log_history if "eval_loss" in entry)
        metrics.update({f"{k}_before": v for k, v in start.items() if k in ("eval_loss", "eval_accuracy", "eval_order_agreement")})
    metrics.update({f"train_{k}" if not k.startswith("train") else k: v for k, v in train_result.metrics.items()})
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())

    # ---------------------------------------------------------------- save
    save_final_model(trainer, output.staging, tokenizer, merge_lora=not model_args.save_adapter_only)
    args = to_dict(script_args, model_args, training_args)
    run_info = {
        **trainer_run_info(script_args, model_args, model_record, tokenizer, pad_action, train_rows, data.report,
                           comparisons={"train": train_counts, "eval": eval_counts}),
        RUN_INFO_KEY: template.to_dict(),
        "label_token_ids": candidates,
        "pairwise_forward": trainer.pairwise_layout,
    }
    metrics["data"] = {"train": train_counts, "eval": eval_counts}
    output.finalize(run_info, metrics, args)
    return metrics


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
