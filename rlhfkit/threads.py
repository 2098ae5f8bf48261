"""Thread count that follows a hint file, so a stage that outlives its partner gets the freed cores.

Two stages side by side on a 2-core CPU run best with one thread each (torch's threads spin-wait for each other
when the cores are oversubscribed); when one ends, the other should take both cores. A chain script (the demo)
writes the count it wants into the file named by `$RLHFKIT_THREADS_FILE`; `follow()` is called between steps by
the long-running loops (ppo_train.py's PPO steps, generate.py's batches, and through `follow_between_steps` every
HF-Trainer stage's optimizer steps) and applies a changed count. Without the variable, or with an unreadable file,
nothing changes.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)
ENV = "RLHFKIT_THREADS_FILE"


def follow() -> int | None:
    """Apply the hinted thread count if it differs from torch's; returns the count now in use (None: no hint)."""
    path = os.environ.get(ENV)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            wanted = int(handle.read().strip())
    except (OSError, ValueError):
        return None
    import torch

    if wanted >= 1 and wanted != torch.get_num_threads():
        logger.info("threads: %d → %d (%s)", torch.get_num_threads(), wanted, path)
        torch.set_num_threads(wanted)
    return torch.get_num_threads()


def follow_between_steps(trainer) -> None:
    """Make an HF `Trainer` call `follow()` after every optimizer step (sft/rm/dpo/pm/prm: in the demo DPO runs beside
    PPO on one core and takes the second when PPO ends). Nothing is added without `$RLHFKIT_THREADS_FILE`."""
    if not os.environ.get(ENV):
        return
    from transformers import TrainerCallback

    class FollowThreadHint(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            follow()

    trainer.add_callback(FollowThreadHint())
