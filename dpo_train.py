"""Direct Preference Optimisation (DPO) stage, on TRL's `DPOTrainer`.

    accelerate launch dpo_train.py --model_name_or_path runs/sft --dataset_path pairs.jsonl --output_dir runs/dpo \
        [--ref_model_path runs/sft] [--beta 0.1] [--loss_type sigmoid] [--precompute_ref_log_probs true]

Features
- Preference data through `rlhfkit.data.load_preferences`: every format of the foundation (canonical pairs, TRL
  explicit/implicit prompt, HH-RLHF raw, LMFlow positive/negative, RewardBench rows) and the pair files
  `annotate/` writes; several sources with `path:N` / `path:0.3`.
- Reference model: `--ref_model_path`, default the starting checkpoint. With LoRA and the default reference
  no second model is loaded (the adapter is switched off); with `--precompute_ref_log_probs` the reference
  log-probs are computed once before training and the reference model is released before the first step.
- `--beta`, `--loss_type` (sigmoid, ipo, hinge, robust, … every one of TRL 1.16's, several at once with
  `--loss_weights`), `--ld_alpha` (LD-DPO), `--use_weighting` (WPO), `--f_divergence_type` (f-DPO): our own loss
  functions (rlhfkit/train/dpo_losses.py), checked against TRL's DPOTrainer on the same batches; LoRA/QLoRA
  with merge on save (`--save_adapter_only` keeps the adapter), gradient checkpointing.
- A held-out split (`--eval_dataset_path` or `--validation_split_percentage`) with reward accuracy and margins
  (TRL's `rewards/accuracies`, `rewards/margins`) in metrics.json.

Assumptions
- Policy and reference share the tokenizer of `--model_name_or_path`.
- Pairs longer than `--max_length` are truncated by TRL from the end (the prompt is kept); they are counted and
  logged here so a too-small `--max_length` does not go unnoticed.
- The starting checkpoint must be a causal LM: a complete stage dir (the parent named in run_info.json) or a plain
  HF dir; an incomplete dir or a reward model is refused.

Output (the stage contract, rlhfkit.checkpoints): `--output_dir` with safetensors weights, tokenizer, metrics.json,
args.yaml and run_info.json naming its parent and reference.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field

from trl import DPOConfig

from rlhfkit.args import ModelArguments, DataArguments, PairwiseArguments, TrainingDefaults
from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.train.dpo_losses import DPOLossConfig
from rlhfkit.train.dpo_trainer import PackedDPOTrainer, check_token_budget
from rlhfkit.errors import UserError

logger = logging.getLogger("dpo_train")


@dataclass
class ScriptArguments(PairwiseArguments, DataArguments):
    ref_model_path: str | None = field(
        default=None, metadata={"help": "Reference model (dir or built-in name); default: --model_name_or_path."}
    )

    def __post_init__(self):
        DataArguments.__post_init__(self)
        PairwiseArguments.__post_init__(self)


@dataclass
class DPOArguments(TrainingDefaults, DPOConfig):
    """TRL's DPOConfig with this toolkit's defaults: no bf16 unless a GPU has it, checkpoints kept for resuming.
    Its loss flags (--loss_type, --loss_weights, --beta, --label_smoothing, --discopop_tau, --ld_alpha,
    --use_weighting, --f_divergence_type, --f_alpha_divergence_coef) are read by rlhfkit/train/dpo_losses.py."""

    def __post_init__(self):
        super().__post_init__()
        DPOLossConfig.from_args(self)  # a bad loss option fails here, in one line, before anything is loaded


ARGUMENTS = (ScriptArguments, ModelArguments, DPOArguments)  # what main takes, in order (CLI, YAML, tests)


def main(script_args: ScriptArguments, model_args: ModelArguments, training_args: DPOArguments) -> dict:
    # ---------------------------------------------------------------- setup
    import datasets
    import transformers

    from rlhfkit.checkpoints import StageOutput, trainer_run_info
    from rlhfkit.saving import save_final_model
    from rlhfkit.data import load_train_eval
    from rlhfkit.faults import install_fault_handlers
    from rlhfkit.threads import follow_between_steps
    from rlhfkit.models import (ensure_pad_token, load_causal_lm, load_tokenizer, match_vocabulary, peft_config,
                                resolve_model)

    StageOutput.check_free(training_args.output_dir, model_args.overwrite_output_dir)
    try:
        check_token_budget(DPOLossConfig.from_args(training_args), script_args.max_tokens_per_batch)
    except ValueError as error:
        raise UserError(str(error)) from None
    setup_logging(training_args.process_index == 0)
    transformers.set_seed(training_args.seed)  # LoRA's initialisation follows --seed, not the process history

    # ---------------------------------------------------------------- model & tokenizer
    model_path, model_record = resolve_model(model_args.model_name_or_path)
    refuse_reward_model(model_args.model_name_or_path, model_record)
    tokenizer = load_tokenizer(model_path, model_args.chat_template, trust_remote_code=training_args.trust_remote_code)
    model = load_causal_lm(model_path, model_args, trust_remote_code=training_args.trust_remote_code)
    vocab_before_pad = model.get_input_embeddings().num_embeddings
    pad_action = ensure_pad_token(tokenizer, model)
    lora = peft_config(model_args, task_type="CAUSAL_LM")

    ref_requested = script_args.ref_model_path or model_args.model_name_or_path
    ref_path, ref_record = resolve_model(ref_requested, role="ref_model_path")
    refuse_reward_model(ref_requested, ref_record)
    ref_is_start = ref_record.get("resolved_path") == model_record.get("resolved_path")
    ref_model = None
    if not ref_is_start or (lora is None and not training_args.precompute_ref_log_probs):
        # Loaded here rather than by TRL so it gets the same dtype, quantisation and pad-token resize as the policy.
        # Not needed when the reference is the start and LoRA (adapter off) or precomputation stands in for it.
        ref_model = load_causal_lm(ref_path, model_args, trust_remote_code=training_args.trust_remote_code)
        match_vocabulary(ref_model, model, vocab_before_pad, ref_requested)
    reference_how = describe_reference(ref_model is not None, lora is not None, training_args.precompute_ref_log_probs)

    # ---------------------------------------------------------------- data
    data, train_rows, eval_rows = load_train_eval(script_args, seed=training_args.seed)
    train_dataset = datasets.Dataset.from_list([trl_row(row) for row in train_rows])
    eval_dataset = datasets.Dataset.from_list([trl_row(row) for row in eval_rows]) if eval_rows else None
    logger.info("training pairs: %d, held-out pairs: %d", len(train_rows), len(eval_rows))

    # ---------------------------------------------------------------- train
    # the staging dir appears only now, so bad input above leaves nothing behind
    stage, resume_from = StageOutput.for_trainer(training_args, "dpo", overwrite=model_args.overwrite_output_dir,
                                                 arguments=(script_args, model_args), dataset=train_rows,
                                                 model=(model_path, ref_path), tokenizer=tokenizer)  # a resume is this run
    arguments = to_dict(script_args, model_args, training_args)
    trainer = PackedDPOTrainer(
        pairwise_forward=script_args.pairwise_forward,
        max_tokens_per_batch=script_args.max_tokens_per_batch,
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )
    too_long = {"train": count_too_long(trainer.train_dataset, training_args.max_length),
                "eval": count_too_long(trainer.eval_dataset, training_args.max_length)}
    # TRL drops pairs whose prompt alone fills max_length (nothing of the responses would be left)
    prompt_too_long = {"train": len(train_rows) - len(trainer.train_dataset),
                       "eval": len(eval_rows) - (len(trainer.eval_dataset) if eval_rows else 0)}
    if len(trainer.train_dataset) == 0:
        raise UserError(f"--max_length {training_args.max_length}: every training prompt alone is longer; raise it")
    if any(too_long.values()) or any(prompt_too_long.values()):
        logger.warning("--max_length %s: pairs truncated (TRL keeps the first max_length tokens): %s; pairs dropped "
                       "(prompt alone too long): %s", training_args.max_length, too_long, prompt_too_long)
    install_fault_handlers(trainer, training_args)  # preemption → checkpoint + exit 75; non-finite loss → stop
    follow_between_steps(trainer)  # take the cores a finished partner stage left (RLHFKIT_THREADS_FILE)
    if training_args.precompute_ref_log_probs and ref_model is not None:
        release_reference(trainer)
        del ref_model
        gc.collect()
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = dict(result.metrics)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("final", metrics)

    # ---------------------------------------------------------------- save
    save_final_model(trainer, stage.staging, tokenizer, merge_lora=not model_args.save_adapter_only)
    run_info = {
        **trainer_run_info(script_args, model_args, model_record, tokenizer, pad_action, train_rows, data.report,
                           train_pairs=len(train_rows), eval_pairs=len(eval_rows), truncated_to_max_length=too_long,
                           dropped_prompt_too_long=prompt_too_long),
        "reference": {"requested": ref_requested, **ref_record,
                      "how": reference_how},
        "objective": {"loss_type": list(training_args.loss_type), "beta": training_args.beta},
        "pairwise_forward": trainer.pairwise_layout,
        "lora": {"merged": not model_args.save_adapter_only} if model_args.use_peft else None,
    }
    stage.finalize(run_info, metrics, arguments)
    return metrics


def trl_row(row: dict) -> dict:
    """A canonical pair as TRL's conversational explicit-prompt row (other fields are not DPO inputs)."""
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def count_too_long(dataset, max_length: int | None) -> int:
    """Pairs of TRL's tokenised dataset (prompt_ids, chosen_ids, rejected_ids) that its collator will truncate."""
    if dataset is None or max_length is None:
        return 0
    columns = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    return sum(
        len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) > max_length
        for row in columns
    )


def refuse_reward_model(requested: str, record: dict) -> None:
    if record.get("parent_stage") == "rm":
        raise UserError(f"{requested}: is a reward model (stage 'rm'); DPO starts from a causal LM (sft/dpo/ppo or HF)")




def release_reference(trainer) -> None:
    """Drop every reference to the reference model once its log-probs are precomputed.

    TRL keeps a `ref_model` passed explicitly even with `precompute_ref_log_probs` (it only skips loading one when
    none is passed), and accelerate's `prepare_model` lists it in `accelerator._models`.
    """
    ref = trainer.ref_model
    trainer.ref_model = None
    trainer.accelerator._models = [m for m in trainer.accelerator._models if m is not ref]


def describe_reference(separate: bool, lora: bool, precompute: bool) -> str:
    """How the reference log-probs were obtained, for run_info.json."""
    source = "a separate reference model" if separate else (
        "the starting policy with LoRA adapters disabled" if lora else "the starting policy")
    if precompute:
        return f"precomputed before training from {source}" + (", then released" if separate else "")
    return f"computed every step from {source}"






if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
