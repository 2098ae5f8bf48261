"""A stage's final weights: the trained model saved from its (gathered) state dict, LoRA merged into the weights
unless `--save_adapter_only`, without Trainer's extras; `merge_lora_state_dict` also feeds PPO's saves and its
vLLM weight push."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .checkpoints import write_log_history
from .errors import UserError

logger = logging.getLogger(__name__)


def merge_lora_state_dict(state_dict: dict, peft_config, adapter: str = "default") -> dict:
    """Fold LoRA weights into the base weights of a PEFT model's *full* state dict (pure; tensors in, tensors out).

    W' = W + scaling · B @ A with scaling = alpha / r (alpha / √r with rsLoRA); `modules_to_save` copies replace the
    originals. Used under ZeRO-3, where the live model's parameters are partitioned and PEFT's `merge_and_unload`
    cannot run, so we merge the gathered 16-bit state dict instead. Plain LoRA on Linear layers only (no DoRA).
    """
    import math

    if getattr(peft_config, "use_dora", False):
        raise UserError("merging DoRA adapters under ZeRO-3 is not supported; use --save_adapter_only true")
    rank, alpha = peft_config.r, peft_config.lora_alpha
    scaling = alpha / math.sqrt(rank) if getattr(peft_config, "use_rslora", False) else alpha / rank
    prefix = "base_model.model."
    merged: dict = {}
    lora: dict[str, dict] = {}
    for key, tensor in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name:
            module, part = name.split(".lora_")[0], name.split(".lora_")[1][0]
            lora.setdefault(module, {})[part] = tensor
        elif ".original_module." in name:
            continue
        elif f".modules_to_save.{adapter}." in name:
            merged[name.replace(f".modules_to_save.{adapter}.", ".")] = tensor
        elif ".base_layer." in name:
            merged.setdefault(name.replace(".base_layer.", "."), tensor)
        else:
            merged.setdefault(name, tensor)
    for module, parts in lora.items():
        weight_key = f"{module}.weight"
        if weight_key not in merged or set(parts) != {"A", "B"}:
            raise UserError(f"cannot merge LoRA for '{module}': base weight or A/B matrix missing from the state dict")
        base = merged[weight_key]
        delta = (parts["B"].float() @ parts["A"].float()) * scaling
        if getattr(peft_config, "fan_in_fan_out", False):
            delta = delta.T
        merged[weight_key] = (base.float() + delta).to(base.dtype)
    return merged


def save_final_model(trainer, out_dir: str | os.PathLike, tokenizer=None, merge_lora: bool = True) -> None:
    """Save a HF Trainer's model into `out_dir` (the StageOutput staging dir) as a plain checkpoint.

    - Full fine-tune: `trainer.save_model`, which under ZeRO-3 gathers 16-bit weights (our DeepSpeed configs set
      `stage3_gather_16bit_weights_on_model_save`).
    - LoRA with `merge_lora`: merged into the base weights, so the next stage loads a plain model. Without ZeRO-3
      PEFT's `merge_and_unload` does it; under ZeRO-3 we gather the full state dict and merge it (above).
    - LoRA without `merge_lora`: the adapter only (`adapter_model.safetensors`), plus the tokenizer.
    Every process must call this (the ZeRO-3 gather is collective); only the main process writes.
    """
    from accelerate.utils import is_peft_model

    out_dir = str(out_dir)
    accelerator = trainer.accelerator
    unwrapped = accelerator.unwrap_model(trainer.model)
    if not is_peft_model(unwrapped) or not merge_lora:
        trainer.save_model(out_dir)
    else:
        zero3 = trainer.is_deepspeed_enabled and getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3
        if zero3:
            state_dict = accelerator.get_state_dict(trainer.model_wrapped)  # collective 16-bit gather
            if accelerator.is_main_process:
                merged = merge_lora_state_dict(state_dict, unwrapped.peft_config["default"])
                base = unwrapped.get_base_model()
                base.save_pretrained(out_dir, state_dict=merged, safe_serialization=True)
        elif accelerator.is_main_process:
            merged_model = unwrapped.merge_and_unload()
            merged_model.save_pretrained(out_dir, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for stray in ("training_args.bin", "README.md"):  # Trainer/TRL extras that are not part of our contract
            path = Path(out_dir) / stray
            if path.exists():
                path.unlink()
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        # every logged step (train and eval), for curves and reports; Trainer keeps it only in checkpoints
        write_log_history(out_dir, trainer.state.log_history)
    accelerator.wait_for_everyone()
