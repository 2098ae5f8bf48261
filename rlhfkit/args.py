"""Argument groups shared by the training stages (one definition, so flags are spelled the same everywhere)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataArguments:
    """Where training data comes from (rm_train.py, dpo_train.py: preference pairs via `rlhfkit.data`; sft_train.py:
    SFT rows via `rlhfkit.train.sft_data`), and how a held-out split is made."""

    dataset_path: list[str] = field(
        default=None,
        metadata={"help": "Training data: files (.jsonl/.jsonl.gz/.json/.parquet), dirs or hub names; "
                  "'path:N' takes N rows, 'path:0.3' a fraction."},
    )
    eval_dataset_path: list[str] = field(default=None, metadata={"help": "Separate held-out data (same formats)."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read from hub datasets / save_to_disk dirs."})
    validation_split_percentage: float = field(
        default=0.0, metadata={"help": "Hold out this percentage of --dataset_path for evaluation (ignored with --eval_dataset_path)."}
    )
    skip_invalid_rows: bool = field(default=False, metadata={"help": "Skip (and count) malformed rows instead of failing."})

    def __post_init__(self):
        if not self.dataset_path:
            raise ValueError("--dataset_path is required")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError("--validation_split_percentage must be in [0, 100)")


@dataclass
class ModelArguments:
    """What to load and how: the backbone, its chat template, LoRA/QLoRA, attention kernel, dtype.

    `trust_remote_code` is not here: TRL's configs (RewardConfig, DPOConfig, SFTConfig) already define it, and
    `rlhfkit.models.model_init_kwargs` takes it from there.
    """

    model_name_or_path: str = field(
        default=None,
        metadata={"help": "Local checkpoint dir (a previous stage's output or any HF model dir) or a built-in name "
                  "(tiny-random-llama, smollm2-135m-instruct, minilm-l6)."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Jinja chat template (string or path to a .jinja file) for tokenizers that have none; "
                  "default for those: a plain 'User:/Assistant:' template (see rlhfkit.tokenization)."},
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "Modules to adapt ('all-linear' or names)."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: 4-bit NF4 base weights with double quantisation (bitsandbytes + CUDA)."}
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "eager | sdpa | flash_attention_2 (needs the flash-attn extra and a GPU)."}
    )
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16 | auto."})
    save_adapter_only: bool = field(
        default=False, metadata={"help": "With --use_peft: save only the adapter instead of merging it into the weights."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a complete --output_dir."})

    def __post_init__(self):
        if self.attn_implementation not in ("eager", "sdpa", "flash_attention_2", "flash_attention_3"):
            raise ValueError(f"--attn_implementation must be eager, sdpa or flash_attention_2, not '{self.attn_implementation}'")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"--dtype must be float32, bfloat16, float16 or auto, not '{self.dtype}'")
        if self.load_in_4bit and not self.use_peft:
            raise ValueError("--load_in_4bit (QLoRA) trains adapters: add --use_peft true")
        if self.save_adapter_only and not self.use_peft:
            raise ValueError("--save_adapter_only needs --use_peft true")


@dataclass
class TrainingDefaults:
    """This toolkit's defaults over a TRL config (mix in first: `class X(TrainingDefaults, DPOConfig)`).

    - bf16 only where a GPU supports it (TRL defaults to bf16, which HF refuses on a CPU);
    - activation (gradient) checkpointing on with a GPU, where memory is the limit, off on CPU, where it only costs
      time; set under its transformers-5 name so no deprecation warning is printed;
    - Trainer checkpoints kept (every 500 steps, the last 2) so `--resume_from_checkpoint true` has something to use;
    - `--report_to wandb|tensorboard` without the package fails in one line instead of deep inside Trainer.
    """

    output_dir: str = field(default=None, metadata={"help": "Where the finished model goes (written atomically)."})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: on when a CUDA GPU supports it, else off."}
    )
    save_strategy: str = field(default="steps", metadata={"help": "Trainer checkpoints (for resuming): steps | epoch | no"})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute activations in the backward pass (less memory, ~30% slower); default: "
                                "on with a CUDA GPU, off on CPU."}
    )
    preemption_signals: str = field(
        default="SIGTERM,SIGUSR1",
        metadata={"help": "Signals that mean 'preempted': save a checkpoint at the next step boundary and exit 75 "
                  "(resume with --resume_from_checkpoint true); 'none' keeps the default (SIGTERM ends the run)."},
    )

    def __post_init__(self):
        import torch

        from .cli import require_reporters

        if self.output_dir is None:
            raise ValueError("--output_dir is required")
        gpu = torch.cuda.is_available()
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = gpu
        if self.bf16 is None:
            self.bf16 = gpu and torch.cuda.is_bf16_supported() and not self.fp16
        super().__post_init__()
        require_reporters(self.report_to)


def pairwise_forward_field():
    """`--pairwise_forward`, one flag for one concept in every stage that lays out sequences sharing a prompt
    (rm, dpo, pm, prm, ppo): its help is `rlhfkit.pairwise.PAIRWISE_FORWARD_HELP`."""
    from .pairwise import PAIRWISE_FORWARD_HELP

    return field(default="auto", metadata={"help": PAIRWISE_FORWARD_HELP})


def check_pairwise_forward(value: str) -> None:
    from .pairwise import PAIRWISE_FORWARDS

    if value not in PAIRWISE_FORWARDS:
        raise ValueError(f"--pairwise_forward must be one of {', '.join(PAIRWISE_FORWARDS)}, not '{value}'")


@dataclass
class PairwiseArguments:
    """How pairs are laid out for the forward (rm_train.py, dpo_train.py; see rlhfkit/pairwise.py)."""

    pairwise_forward: str = pairwise_forward_field()
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={"help": "Split each batch into micro-batches of at most this many laid-out tokens (dynamic batch "
                  "size); the loss, gradient and schedule still count the batch's pairs."},
    )

    def __post_init__(self):
        check_pairwise_forward(self.pairwise_forward)
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 1:
            raise ValueError("--max_tokens_per_batch must be a positive number of tokens")
