"""Loading models and tokenizers the way every stage needs them: built-in names resolved, pad token right,
reward heads with one output, optional GPU-only features refused with one line when unavailable."""

from __future__ import annotations

import logging
import os
from typing import Any

from .errors import UserError

logger = logging.getLogger(__name__)

# Distinct-from-EOS tokens many vocabularies already have; reusing one avoids resizing the embeddings.
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>", "<|end_of_text|>")
REWARD_HEAD_NAMES = ("score", "classifier", "v_head")


# ---------------------------------------------------------------------------------------------------------------
# resolution
# ---------------------------------------------------------------------------------------------------------------
def resolve_model(name_or_path: str, role: str = "model") -> tuple[str, dict]:
    """Map a built-in name or a local dir to a local dir; the record goes into run_info.json.

    Local dirs go through `check_parent`, so an incomplete stage output is refused here, once, for every stage.
    """
    from . import builtin_models
    from .checkpoints import check_parent

    if not name_or_path:
        raise UserError(f"--{'model_name_or_path' if role == 'model' else role} is required")
    if builtin_models.is_builtin(name_or_path) and not os.path.exists(name_or_path):
        path = builtin_models.materialize(name_or_path)
        record: dict[str, Any] = {"builtin": name_or_path, "resolved_path": str(path)}
        describe = getattr(builtin_models, "describe", None)
        if describe is not None:
            record.update(describe(name_or_path))
        return str(path), record
    if os.path.exists(name_or_path) or os.path.exists(name_or_path.rstrip("/") + ".partial"):
        parent = check_parent(name_or_path, role=role)
        return name_or_path, {"resolved_path": os.path.abspath(name_or_path), "parent_stage": parent["stage"]}
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        # a hub id: transformers resolves it (from its cache when offline); a failure becomes a UserError at load
        return name_or_path, {"hub_id": name_or_path}
    raise UserError(f"{name_or_path}: {role} not found (not a local dir, a built-in name or a hub id)")


# ---------------------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------------------
def load_tokenizer(path: str, chat_template: str | None = None, padding_side: str = "right", trust_remote_code=False):
    from transformers import AutoTokenizer

    from .tokenization import set_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UserError(f"{path}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None
    tokenizer.padding_side = padding_side
    tokenizer.init_kwargs["rlhfkit_chat_template_source"] = set_chat_template(tokenizer, chat_template)
    return tokenizer


def ensure_pad_token(tokenizer, model=None) -> str:
    """Give the tokenizer a pad token distinct from EOS and write its id into the model config.

    Why distinct: a sequence-classification head reads the score at the last non-pad token; with pad == EOS a
    response ending in EOS is scored one token early, and with `config.pad_token_id` unset HF models cannot find
    the last token at all (training stalls at loss log 2 = 0.693). Returns what was done, for the log.
    """
    action = "kept"
    pad, eos = tokenizer.pad_token, tokenizer.eos_token
    if pad is None or (eos is not None and pad == eos):
        vocab = tokenizer.get_vocab()
        unk = tokenizer.unk_token
        candidates = ([unk] if unk and unk != eos else []) + [tok for tok in _PAD_CANDIDATES if tok != eos]
        choice = next((tok for tok in candidates if tok in vocab and tok != tokenizer.bos_token), None)
        if choice is not None:
            tokenizer.pad_token = choice
            action = f"reused '{choice}' (was {pad!r})"
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            action = "added '<|pad|>'"
            if model is not None:
                model.resize_token_embeddings(len(tokenizer))
        logger.info("pad token: %s; EOS stays %r", action, eos)
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        text_config = getattr(model.config, "get_text_config", None)
        if text_config is not None:
            text_config().pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return action


# ---------------------------------------------------------------------------------------------------------------
# model kwargs, LoRA, QLoRA
# ---------------------------------------------------------------------------------------------------------------
def torch_dtype(name: str):
    """A `--dtype` flag's value → what `from_pretrained(dtype=…)` takes: float32 | bfloat16 | float16 → the torch
    dtype, auto → "auto" (the checkpoint's own). The one place the names are mapped."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


def model_init_kwargs(model_args, trust_remote_code: bool = False) -> dict:
    """from_pretrained kwargs, refusing GPU-only options on a machine that cannot honour them."""
    from .cli import require, require_cuda

    kwargs: dict[str, Any] = {"dtype": torch_dtype(model_args.dtype), "trust_remote_code": trust_remote_code}
    if model_args.attn_implementation.startswith("flash_attention"):
        require("flash_attn", f"--attn_implementation {model_args.attn_implementation}", extra="flash-attn")
        require_cuda(f"--attn_implementation {model_args.attn_implementation}")
    kwargs["attn_implementation"] = model_args.attn_implementation
    quant = quantization_config(model_args)
    if quant is not None:
        kwargs["quantization_config"] = quant
    return kwargs


def quantization_config(model_args):
    """4-bit NF4 with double quantisation (QLoRA), or None."""
    if not getattr(model_args, "load_in_4bit", False):
        return None
    from .cli import require, require_cuda

    require("bitsandbytes", "--load_in_4bit (QLoRA)")
    require_cuda("--load_in_4bit (QLoRA)")
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def reward_head_names(model) -> list[str]:
    """Names of the sequence-classification head modules (`score` for decoder LMs, `classifier` for encoders)."""
    return [name for name in REWARD_HEAD_NAMES if hasattr(model, name)]


def peft_config(model_args, task_type: str, modules_to_save: list[str] | None = None):
    """LoRA config from the shared flags. For reward models pass the head names so the head is trained and saved."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    target_modules = "all-linear" if targets in (["all-linear"], "all-linear") else list(targets)
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=target_modules,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


# ---------------------------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------------------------
def _load(auto_cls, path: str, **kwargs):
    try:
        return auto_cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot load model ({first})") from None


def load_reward_model(path: str, model_args=None, new_head: bool = False, **kwargs):
    """An `AutoModelForSequenceClassification` with exactly one output.

    `new_head=True` (training from a backbone): create a 1-output head. Otherwise the checkpoint must already be a
    reward model: a `*ForCausalLM` or a 2-label classifier is refused instead of silently getting a random head.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    init = model_init_kwargs(model_args) if model_args is not None else {}
    init.update(kwargs)
    if not new_head:
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=init.get("trust_remote_code", False))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read config.json ({str(exc).splitlines()[0]})") from None
        architectures = config.architectures or []
        if not any(arch.endswith("ForSequenceClassification") for arch in architectures):
            raise UserError(
                f"{path}: not a reward model (architectures={architectures}); train one with rm_train.py "
                f"or pass a *ForSequenceClassification checkpoint"
            )
        if getattr(config, "num_labels", 1) != 1:
            raise UserError(f"{path}: reward model has {config.num_labels} labels; a reward model has exactly 1")
    model = _load(AutoModelForSequenceClassification, path, num_labels=1, **init)
    return model


def load_frozen_causal_lm(path: str, dtype=None, device=None):
    """(tokenizer, model) of a causal-LM checkpoint used as a scorer: eval mode, a pad token, on `device` (the
    pairwise preference model and the process reward model, `rlhfkit.preference_model` / `process_reward`)."""
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, **({"dtype": dtype} if dtype is not None else {})).eval()
    ensure_pad_token(tokenizer, model)
    if device is not None:
        model.to(device)
    return tokenizer, model


def load_label_token_checkpoint(path: str, role: str, read_spec, key: str, trained_by: str, dtype=None, device=None):
    """(spec, tokenizer, model) of a label-token checkpoint (the pairwise PM, the PRM): a complete stage output
    (`check_parent`) whose run_info.json holds `key`, read by `read_spec(path)`; the model frozen as a scorer. A
    checkpoint without it is refused in one line naming `trained_by`, the stage that writes one."""
    from .checkpoints import check_parent

    check_parent(path, role=role)
    spec = read_spec(path)
    if spec is None:
        raise UserError(f"{path}: not a {role} (run_info.json has no '{key}'; train one with {trained_by})")
    tokenizer, model = load_frozen_causal_lm(path, dtype, device)
    return spec, tokenizer, model


def load_causal_lm(path: str, model_args=None, **kwargs):
    from transformers import AutoModelForCausalLM

    init = model_init_kwargs(model_args) if model_args is not None else {}
    init.update(kwargs)
    return _load(AutoModelForCausalLM, path, **init)


def resolve_causal_start(model_args, what: str, trust_remote_code: bool = False) -> tuple[str, dict, object]:
    """(model_path, model_record, tokenizer) of the causal LM a training stage starts from (SFT, the PM, the PRM);
    a reward model (stage "rm") is refused in one line naming `what` the stage trains."""
    model_path, model_record = resolve_model(model_args.model_name_or_path)
    if model_record.get("parent_stage") == "rm":
        raise UserError(f"{model_args.model_name_or_path}: is a reward model (stage 'rm'); {what} starts from a "
                        "causal LM")
    tokenizer = load_tokenizer(model_path, model_args.chat_template, trust_remote_code=trust_remote_code)
    return model_path, model_record, tokenizer


def load_trainable_causal_lm(model_path: str, model_args, tokenizer, trust_remote_code: bool = False):
    """(model, pad_action): the causal LM with a pad token (`ensure_pad_token`), wrapped in LoRA (peft) when the
    flags ask for it. For stages whose Trainer takes a ready model (SFT hands the LoRA config to TRL instead)."""
    model = load_causal_lm(model_path, model_args, trust_remote_code=trust_remote_code)
    pad_action = ensure_pad_token(tokenizer, model)
    lora = peft_config(model_args, "CAUSAL_LM")
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
    return model, pad_action


def match_vocabulary(ref_model, model, vocab_before_pad: int, ref_requested: str) -> None:
    """A reference must score the same token ids as the policy; follow the policy's pad-token resize (the pad row is
    never scored). Any other vocabulary difference means another tokenizer, which DPO and implicit rewards refuse."""
    ref_vocab = ref_model.get_input_embeddings().num_embeddings
    policy_vocab = model.get_input_embeddings().num_embeddings
    if ref_vocab == policy_vocab:
        return
    if ref_vocab == vocab_before_pad:
        ref_model.resize_token_embeddings(policy_vocab)
        return
    raise UserError(f"{ref_requested}: reference vocabulary ({ref_vocab}) differs from the policy's ({policy_vocab}); "
                    "the reference needs the same tokenizer")
