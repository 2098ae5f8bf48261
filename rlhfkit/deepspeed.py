"""DeepSpeed configs built by one pure function, so tests can check them and the JSON files in configs/ are
generated rather than hand-edited (`python -m rlhfkit.deepspeed` rewrites them)."""

from __future__ import annotations

import json
from pathlib import Path


def deepspeed_config(stage: int, offload_optimizer: bool = False, offload_params: bool = False,
                     precision: str = "auto") -> dict:
    """A DeepSpeed JSON config for ZeRO stage 2 or 3, with HF-Trainer "auto" values where the Trainer fills them.

    - ZeRO-3 sets `stage3_gather_16bit_weights_on_model_save`: without it `save_pretrained` writes empty or partial
      weights (the failure RLHFlow's README warns about).
    - `precision`: "auto" lets the Trainer's --bf16/--fp16 decide; "bf16" / "fp16" / "fp32" force one.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    if offload_params and stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage >= 2:
        zero["reduce_bucket_size"] = "auto"
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }
    if precision == "auto":
        config["bf16"] = {"enabled": "auto"}
        config["fp16"] = {"enabled": "auto"}
    else:
        config["bf16"] = {"enabled": precision == "bf16"}
        config["fp16"] = {"enabled": precision == "fp16"}
    return config


PRESETS = {
    "zero2.json": dict(stage=2),
    "zero3.json": dict(stage=3),
    "zero3_offload.json": dict(stage=3, offload_optimizer=True, offload_params=True),
}


def write_presets(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, kwargs in PRESETS.items():
        path = directory / name
        path.write_text(json.dumps(deepspeed_config(**kwargs), indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_presets(Path(__file__).resolve().parent.parent / "configs" / "deepspeed"):
        print(written_path)
