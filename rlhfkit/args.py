"""Argument groups shared by the training stages (one definition, so flags are spelled the same everywhere)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
