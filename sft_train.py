"""Supervised fine-tuning (SFT) stage, on TRL's `SFTTrainer`.

    accelerate launch sft_train.py --model_name_or_path tiny-random-llama --dataset_path data/sft.jsonl \
        --output_dir runs/sft [--config configs/recipes/sft/<recipe>.yaml]

Features
- Data (rlhfkit.train.sft_data): message lists, prompt/completion, ShareGPT, canonical preference pairs and raw HH-RLHF
  dialogues (the chosen side), plain text, LMFlow `text_only`/`text2text` files, and `--text_template` for
  question/answer rows ("Question: {question}\\n\\nAnswer: {response}"); `path:N` / `path:0.25` subsamples a source.
- Loss on assistant tokens only by default (`--assistant_only_loss`): by the template's `{% generation %}` markers
  (or TRL's patched copy of a known template), else by rendering each conversation turn by turn and training the
  tokens each assistant turn adds (rlhfkit.train.sft_data.assistant_token_mask, as open-instruct does);
  with `--text_template` the same flag puts the loss on the last field only; plain text trains on every token.
- `--packing`, `--max_length`, `--gradient_checkpointing`, LoRA (`--use_peft`) and QLoRA (`--load_in_4bit`, needs
  bitsandbytes and a CUDA GPU), `--chat_template` for tokenizers without one.
- LoRA is merged on save (a plain checkpoint); `--save_adapter_only true` keeps just the adapter.
- Held-out loss before and after training (`--eval_dataset_path` or `--validation_split_percentage`).

Assumptions
- All rows of one run are of one kind (chat, plain text, or template); mixing them is refused, since TRL picks the
  format from the first row.
- Assistant-only loss without markers needs a template that renders incrementally (each prefix of a conversation
  renders as a token prefix of the whole); for one that does not, the stage stops with a one-line error naming the
  fix.

Output (the stage contract, rlhfkit.checkpoints): `--output_dir` with safetensors weights, tokenizer, metrics.json,
args.yaml and run_info.json (parent, resolved model, dataset fingerprint and drop counts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trl import SFTConfig

from rlhfkit.args import DataArguments, ModelArguments, TrainingDefaults
from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.errors import UserError

logger = logging.getLogger("sft_train")


@dataclass
class ScriptArguments(DataArguments):
    """Data flags (training flags are TRL's `SFTConfig`, model flags `rlhfkit.args.ModelArguments`)."""

    text_template: str | None = field(
        default=None,
        metadata={"help": "Format rows as text, e.g. 'Question: {question}\\n\\nAnswer: {response}'; the loss "
                  "covers the last field when --assistant_only_loss is on."},
    )


@dataclass
class SFTArguments(TrainingDefaults, SFTConfig):
    """TRL's SFTConfig with this toolkit's defaults: assistant-only loss on, no bf16 unless a GPU has it, checkpoints
    kept for resuming."""

    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "Loss on assistant tokens only (chat data) or on the template's last field "
                  "(--text_template). Plain text always trains on every token."},
    )


ARGUMENTS = (ScriptArguments, ModelArguments, SFTArguments)  # what main takes, in order (CLI, YAML, tests)


def main(script_args: ScriptArguments, model_args: ModelArguments, training_args: SFTArguments) -> dict:
    # ---------------------------------------------------------------- setup
    from trl import SFTTrainer

    from rlhfkit.checkpoints import StageOutput, trainer_run_info
    from rlhfkit.saving import save_final_model
    from rlhfkit.data import train_eval_split
    from rlhfkit.faults import install_fault_handlers
    from rlhfkit.threads import follow_between_steps
    from rlhfkit.models import ensure_pad_token, load_causal_lm, peft_config, resolve_causal_start
    from rlhfkit.train.sft_data import load_sft

    StageOutput.check_free(training_args.output_dir, model_args.overwrite_output_dir)
    arguments = to_dict(script_args, model_args, training_args)
    setup_logging(training_args.process_index == 0)

    # ---------------------------------------------------------------- model & tokenizer
    model_path, model_record, tokenizer = resolve_causal_start(model_args, "SFT", training_args.trust_remote_code)
    model = load_causal_lm(model_path, model_args, trust_remote_code=training_args.trust_remote_code)
    pad_action = ensure_pad_token(tokenizer, model)
    lora = peft_config(model_args, task_type="CAUSAL_LM")

    # ---------------------------------------------------------------- data
    read = {"text_template": script_args.text_template, "seed": training_args.seed,
            "skip_invalid": script_args.skip_invalid_rows, "split": script_args.dataset_split}
    data = load_sft(script_args.dataset_path, **read)
    if script_args.eval_dataset_path:
        train_rows = data.rows
        eval_data = load_sft(script_args.eval_dataset_path, **read)
        if eval_data.kind != data.kind:
            raise UserError(f"{', '.join(script_args.eval_dataset_path)}: eval data is {eval_data.kind} rows, "
                            f"training data {data.kind} rows; they must be the same kind")
        eval_rows = eval_data.rows
    else:
        train_rows, eval_rows = train_eval_split(data.rows, script_args.validation_split_percentage,
                                                 seed=training_args.seed)
    masking = configure_loss_masking(training_args, data.kind, tokenizer)
    train_dataset = sft_dataset(train_rows, tokenizer, masking)
    eval_dataset = sft_dataset(eval_rows, tokenizer, masking) if eval_rows else None
    logger.info("training rows: %d, held-out rows: %d", len(train_rows), len(eval_rows))

    # ---------------------------------------------------------------- train
    # the staging dir appears only now, so bad input above leaves nothing behind
    stage, resume_from = StageOutput.for_trainer(training_args, "sft", overwrite=model_args.overwrite_output_dir,
                                                 arguments=(script_args, model_args), dataset=train_rows,
                                                 model=model_path, tokenizer=tokenizer)  # a resume is this run
    trainer = build_trainer(SFTTrainer, model, tokenizer, training_args, train_dataset, eval_dataset, lora)
    install_fault_handlers(trainer, training_args)
    follow_between_steps(trainer)  # take the cores a finished partner stage left (RLHFKIT_THREADS_FILE)
    # TRL drops rows left with no trained token after truncation (e.g. a prompt alone filling max_length)
    dropped_by_max_length = 0 if training_args.packing else len(train_rows) - len(trainer.train_dataset)
    if len(trainer.train_dataset) == 0:
        raise UserError(f"--max_length {training_args.max_length}: no training row keeps a trained token; raise it")
    if dropped_by_max_length:
        logger.warning("--max_length %s: %d training rows had no trained token left and were dropped",
                       training_args.max_length, dropped_by_max_length)
    metrics: dict = {}
    if eval_dataset is not None and resume_from is None:
        metrics.update({f"{k}_before": v for k, v in trainer.evaluate().items() if k == "eval_loss"})
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics.update(result.metrics)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("final", metrics)

    # ---------------------------------------------------------------- save
    save_final_model(trainer, stage.staging, tokenizer, merge_lora=not model_args.save_adapter_only)
    run_info = {
        **trainer_run_info(script_args, model_args, model_record, tokenizer, pad_action, train_rows, data.report,
                           kind=data.kind, train_rows=len(train_rows), eval_rows=len(eval_rows),
                           dropped_by_max_length=dropped_by_max_length),
        "loss_on": loss_scope(training_args, masking),
        "assistant_mask": masking,
        # the shared `tokenizer` block holds these two; kept under their earlier names for existing readers
        "pad_token": pad_action,
        "chat_template_source": tokenizer.init_kwargs.get("rlhfkit_chat_template_source"),
        "lora": {"merged": not model_args.save_adapter_only} if model_args.use_peft else None,
    }
    stage.finalize(run_info, metrics, arguments)
    return metrics






GENERATION_MARKERS = "generation markers"  # TRL masks by the template's {% generation %} (or its patched copy)
INCREMENTAL_RENDER = "incremental render"  # we tokenise, masking what each assistant turn adds (rlhfkit.train.sft_data)


def configure_loss_masking(training_args: SFTArguments, kind: str, tokenizer) -> str | None:
    """Map our one `--assistant_only_loss` flag onto TRL's two, by data kind; return how assistant tokens are found.

    TRL has `assistant_only_loss` (chat rows, `{% generation %}` masks) and `completion_only_loss` (prompt/completion
    rows) and raises if the first is set on non-chat data; plain text has no response to single out. A chat template
    without markers that TRL cannot patch gets INCREMENTAL_RENDER: `sft_dataset` tokenises the rows with their
    assistant mask, and TRL's own flag is turned off (it would refuse the template; it builds labels from the mask).
    Returns GENERATION_MARKERS, INCREMENTAL_RENDER, or None when the loss is not on assistant tokens.
    """
    wanted = training_args.assistant_only_loss
    if kind == "messages":
        training_args.completion_only_loss = None
        if not wanted:
            return None
        from trl.chat_template_utils import get_training_chat_template

        try:
            get_training_chat_template(tokenizer)
        except ValueError:
            training_args.assistant_only_loss = False
            logger.info("--assistant_only_loss: the chat template has no {% generation %} markers; masking "
                        "assistant tokens by rendering each conversation turn by turn")
            return INCREMENTAL_RENDER
        return GENERATION_MARKERS
    elif kind == "prompt_completion":
        training_args.assistant_only_loss = False
        training_args.completion_only_loss = wanted
    else:
        if wanted:
            logger.info("plain-text SFT data: the loss covers every token (--assistant_only_loss does not apply)")
        training_args.assistant_only_loss = False
        training_args.completion_only_loss = False


def sft_dataset(rows: list[dict], tokenizer, masking: str | None):
    """The rows as the `datasets.Dataset` SFTTrainer takes: already tokenised, with their assistant mask, under
    INCREMENTAL_RENDER (the one-line error comes from here where the template cannot be rendered turn by turn)."""
    import datasets

    from rlhfkit.train.sft_data import tokenize_assistant_only

    if masking == INCREMENTAL_RENDER:
        rows = tokenize_assistant_only(rows, tokenizer)
    return datasets.Dataset.from_list(rows)


def loss_scope(training_args: SFTArguments, masking: str | None) -> str:
    if masking is not None:
        return "assistant tokens"
    if training_args.completion_only_loss:
        return "completion (last template field)"
    return "all tokens"


def build_trainer(trainer_cls, model, tokenizer, training_args, train_dataset, eval_dataset, lora):
    """The SFTTrainer as main() builds it (also used by tests to inspect the prepared, masked dataset)."""
    try:
        return trainer_cls(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )
    except RuntimeError as exc:
        if "no assistant tokens" in str(exc):  # TRL's message when a template marks nothing
            raise UserError("--assistant_only_loss: a conversation renders with no assistant tokens under this chat "
                            "template; check its {% generation %} markers") from None
        raise


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
