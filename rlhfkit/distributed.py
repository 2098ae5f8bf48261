"""Process-group setup that also works on a CPU-only machine.

accelerate forms a multi-process group on CPUs (gloo) only when asked with `cpu=True`; without it, processes
started by `accelerate launch --config_file configs/accelerate/ddp.yaml` (or torchrun) on a machine without CUDA
each believe they are alone, and every one of them does all the work. Stages that build their own Accelerator /
PartialState go through here; HF-Trainer stages get the same from `use_cpu` (set by `rlhfkit.cli` on CPU machines).
"""

from __future__ import annotations

import os


def cpu_only() -> bool:
    """True without a CUDA GPU, unless DeepSpeed is launching (it brings its own CPU accelerator and process group)."""
    import torch

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return not torch.cuda.is_available() and not deepspeed


def partial_state():
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())


def new_accelerator(**kwargs):
    from accelerate import Accelerator

    kwargs.setdefault("cpu", cpu_only())
    return Accelerator(**kwargs)
