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

from rlhfkit.args import DataArguments, ModelArguments, check_pairwise_forward, pairwise_forward_field
from rlhfkit.cli import run_stage, setup_logging
from rlhfkit.errors import UserError
from rlhfkit.train.label_token_trainer import LabelTokenArguments

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
class PMArguments(LabelTokenArguments):
    """HF TrainingArguments with this toolkit's defaults (rlhfkit.args.TrainingDefaults)."""

    max_length: int | None = field(default=2048, metadata={"help": "Longest comparison (both responses, the "
                                   "context and the template) in tokens; longer pairs are dropped and counted."})


ARGUMENTS = (ScriptArguments, ModelArguments, PMArguments)  # what main takes, in order (CLI, YAML, tests)


def main(script_args: ScriptArguments, model_args: ModelArguments, training_args: PMArguments) -> dict:
    # ---------------------------------------------------------------- setup
    import transformers

    from rlhfkit.checkpoints import StageOutput, trainer_run_info
    from rlhfkit.data import load_train_eval
    from rlhfkit.models import load_trainable_causal_lm, resolve_causal_start
    from rlhfkit.preference_model import RUN_INFO_KEY, PairTemplate, label_token_ids, training_examples
    from rlhfkit.train.label_token_trainer import train_label_token_stage

    StageOutput.check_free(training_args.output_dir, model_args.overwrite_output_dir)
    setup_logging(training_args.process_index == 0)
    transformers.set_seed(training_args.seed)

    # ---------------------------------------------------------------- model & tokenizer
    trust = training_args.trust_remote_code
    model_path, model_record, tokenizer = resolve_causal_start(model_args, "a preference model", trust)
    template = PairTemplate(**({"template": script_args.template} if script_args.template else {}))
    template = PairTemplate.from_dict(template.to_dict(), where="--template")  # the same checks as on reload
    candidates = label_token_ids(tokenizer, template)  # before the model loads: a bad tokenizer fails fast
    model, pad_action = load_trainable_causal_lm(model_path, model_args, tokenizer, trust)

    # ---------------------------------------------------------------- data
    data, train_rows, eval_rows = load_train_eval(script_args, seed=training_args.seed)
    max_length = training_args.max_length
    train_records, train_counts = training_examples(train_rows, tokenizer, template, max_length)
    eval_records, eval_counts = training_examples(eval_rows, tokenizer, template, max_length)
    logger.info("comparisons (both orders per pair, max_length=%s): train %s; eval %s",
                max_length, train_counts, eval_counts)
    if not train_records:
        raise UserError(f"all {len(train_rows)} training pairs are longer than --max_length {max_length}")

    # ---------------------------------------------------------------- train & save
    counts = {"train": train_counts, "eval": eval_counts}
    run_info = {**trainer_run_info(script_args, model_args, model_record, tokenizer, pad_action, train_rows, data.report,
                                  comparisons=counts),
                RUN_INFO_KEY: template.to_dict()}
    return train_label_token_stage(
        "pm", script_args, model_args, training_args, model=model, model_path=model_path, tokenizer=tokenizer,
        candidates=candidates, train_rows=train_rows, train_records=train_records, eval_records=eval_records,
        metric="pairs", run_info=run_info, counts=counts)


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
