"""Faults a long run meets, handled the same way in every training stage: preemption, a diverging loss, a full disk.

One call per Trainer stage, right after the trainer is built:

    install_fault_handlers(trainer, training_args)

- **Preemption** (a cluster's SIGTERM with a grace period, or SIGUSR1 sent ahead of it; `--preemption_signals`):
  the handler only sets a flag; at the next step boundary the run saves a Trainer checkpoint under
  `OUT.partial/checkpoints/` and exits with `EXIT_PREEMPTED` (75, EX_TEMPFAIL) and one line saying how to resume
  (the same command plus `--resume_from_checkpoint true`). A second signal stops at once, the default way. With
  several processes the flag is all-reduced every step, so every rank saves the same step (the save is collective).
- **Checksums**: every Trainer checkpoint gets its `checksums.json` (size and sha256 of every file) after all its files
  are written (`seal_checkpoint`, also called by PPO's `save_checkpoint`); resuming trusts only sealed checkpoints.
- **Non-finite loss**: every micro-batch loss is checked; a NaN/inf stops training at the end of that step with one
  line naming the step, before anything is saved from the diverged weights, so the last checkpoint (which was finite)
  is what `--resume_from_checkpoint true` continues from.

Custom loops (PPO) use `PreemptionGuard` directly: `guard = PreemptionGuard.from_args(args)` before the loop,
`guard.save_and_exit_if_requested(step, save, checkpoint_dir, device, is_main)` at the end of every step, and
`check_finite(loss, step, checkpoints_dir)` on a loss gathered over ranks. Disk errors (ENOSPC, EACCES, EROFS) are
turned into one line naming the path by `rlhfkit.cli.run_stage` (`disk_error_message`).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

from .errors import UserError

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", distinct from bad input (2) and crashes (1)
DEFAULT_SIGNALS = "SIGTERM,SIGUSR1"
RESUME_HINT = "rerun the same command with --resume_from_checkpoint true to continue"


class Preempted(SystemExit):
    """Raised at a step boundary after a preemption checkpoint was saved; exits with `EXIT_PREEMPTED`."""

    def __init__(self, message: str):
        super().__init__(EXIT_PREEMPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message


def parse_signals(text: str | None) -> list[signal.Signals]:
    """`"SIGTERM,SIGUSR1"` → signals; `"none"` or empty → no handler (the default: SIGTERM ends the process)."""
    if text is None or str(text).strip().lower() in ("", "none", "false", "no"):
        return []
    out = []
    for name in str(text).replace(" ", "").split(","):
        upper = name.upper()
        upper = upper if upper.startswith("SIG") else f"SIG{upper}"
        if upper in ("SIGKILL", "SIGSTOP") or not hasattr(signal, upper):
            raise UserError(f"--preemption_signals: '{name}' is not a signal that can be caught (use e.g. SIGTERM,SIGUSR1)")
        out.append(getattr(signal, upper))
    return out


_INSTALLED: list["PreemptionGuard"] = []  # guards with live handlers, newest last (for uninstall_all)


def uninstall_all() -> None:
    """Restore the signal handlers of every guard still installed (a stage that ended by an exception; called by
    `rlhfkit.cli.run_stage` whatever the outcome)."""
    for guard in reversed(list(_INSTALLED)):
        guard.uninstall()


class PreemptionGuard:
    """Signal handlers that turn a preemption signal into a flag checked at step boundaries."""

    def __init__(self, signals: list[signal.Signals] | str | None = DEFAULT_SIGNALS):
        self.signals = parse_signals(signals) if isinstance(signals, str) or signals is None else list(signals)
        self.received: signal.Signals | None = None
        self._previous: dict = {}
        if threading.current_thread() is not threading.main_thread():  # signal.signal works only there
            logger.warning("preemption handling is off: not running in the main thread")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self._previous:
            _INSTALLED.append(self)

    @classmethod
    def from_args(cls, args) -> "PreemptionGuard":
        return cls(getattr(args, "preemption_signals", DEFAULT_SIGNALS))

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second signal: stop now, the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum)
        logger.warning("received %s: saving a checkpoint at the end of this step, then stopping (send it again to "
                       "stop at once)", self.received.name)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def stop_requested(self, device=None) -> bool:
        """Whether any process was signalled; collective when torch.distributed is running (call on every rank)."""
        return bool(_any_rank([self.requested], device)[0])

    def save_and_exit_if_requested(self, step: int, save, checkpoint_dir: str | os.PathLike, device=None,
                                   main_process: bool = True) -> None:
        """For custom loops, at the end of step `step` on every rank: if any rank was signalled, run `save()` (a
        collective checkpoint save, e.g. `rlhfkit.rl.ppo.save_checkpoint`) and exit with the one line."""
        if self.stop_requested(device):
            save()
            self.exit(step, checkpoint_dir, main_process)

    def exit(self, step: int, checkpoint_dir: str | os.PathLike | None, main_process: bool = True,
             what: str | None = None, resume_hint: str = RESUME_HINT):
        """Print the one line and raise `Preempted` (after the checkpoint of `step` was saved). `what` replaces
        "at step N: checkpoint saved to …" for outputs that are not checkpoints (generation rows)."""
        name = self.received.name if self.received is not None else "a signal"
        saved = f"checkpoint saved to {checkpoint_dir}" if checkpoint_dir else "nothing to save yet"
        message = f"preempted by {name} {what or f'at step {step}: {saved}'}; {resume_hint}"
        self.uninstall()
        if main_process:
            print(f"preempted: {message}", file=sys.stderr, flush=True)
        raise Preempted(message)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            try:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._previous = {}
        if self in _INSTALLED:
            _INSTALLED.remove(self)


def _any_rank(flags: list[bool], device=None) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (a no-op without torch.distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def check_finite(loss, step: int, output_dir: str | os.PathLike | None = None) -> None:
    """Raise the one-line divergence error if `loss` (a float or tensor) is NaN or infinite."""
    value = float(loss.detach().float().sum()) if hasattr(loss, "detach") else float(loss)
    if not math.isfinite(value):
        raise UserError(divergence_message(value, step, output_dir))


def divergence_message(value: float, step: int, checkpoints_dir: str | os.PathLike | None) -> str:
    last = _last_checkpoint(checkpoints_dir) if checkpoints_dir else None
    keep = (f"the last checkpoint, {last}, is from before it: resume with --resume_from_checkpoint true (lower "
            f"--learning_rate or fix the data)" if last else "no checkpoint was saved before it (lower "
            "--learning_rate, raise --max_grad_norm clipping, or fix the data, then rerun)")
    return f"training diverged: non-finite loss ({value}) at step {step}; stopped without saving it; {keep}"


def _last_checkpoint(directory) -> str | None:
    directory = Path(directory)
    if not directory.is_dir():
        return None
    done = [(int(p.name.split("-")[1]), p) for p in directory.glob("checkpoint-*")
            if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(done)[1]) if done else None


def seal_checkpoint(checkpoint: str | os.PathLike, main_process: bool) -> None:
    """Write the checkpoint's checksums.json, last, once every rank has written its files (collective: call on
    every rank). `StageOutput.last_checkpoint` resumes only from a sealed checkpoint that still matches it."""
    import torch.distributed as dist

    from .integrity import write_checksums

    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.barrier()  # rank k writes its own RNG (and, sharded, optimizer) files into the same dir
    if main_process and Path(checkpoint).is_dir():
        write_checksums(checkpoint)
    if distributed:
        dist.barrier()  # no rank leaves (a preempted one exits) before the seal: the launcher would stop the rest


def _trainer_callback_class():
    from transformers import TrainerCallback

    class FaultCallback(TrainerCallback):
        """Preemption at step boundaries and the non-finite loss stop, for HF Trainer stages."""

        def __init__(self, guard: PreemptionGuard, main_process: bool):
            self.guard = guard
            self.main_process = main_process
            self.nonfinite: float | None = None  # the first non-finite micro-batch loss of the current step
            self.preempting = False

        def on_step_end(self, args, state, control, **kwargs):
            preempt, diverged = _any_rank([self.guard.requested, self.nonfinite is not None])
            if diverged:
                self.guard.uninstall()
                value = self.nonfinite if self.nonfinite is not None else float("nan")
                raise UserError(divergence_message(value, state.global_step, args.output_dir))
            if preempt:
                if self.guard.received is None:  # another rank was signalled: act the same
                    self.guard.received = signal.SIGTERM
                self.preempting = True
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            seal_checkpoint(checkpoint, self.main_process)
            if self.preempting:
                self.guard.exit(state.global_step, checkpoint, self.main_process)
            return control

        def on_train_end(self, args, state, control, **kwargs):
            self.guard.uninstall()  # after training a signal ends the process as usual (the final save is atomic)
            return control

    return FaultCallback


def install_fault_handlers(trainer, args=None):
    """Preemption (signals → checkpoint at the next step boundary, exit 75) and the non-finite loss stop, on a HF
    Trainer. `args`: the stage's training arguments (`--preemption_signals`); default `trainer.args`."""
    args = trainer.args if args is None else args
    guard = PreemptionGuard.from_args(args)
    callback = _trainer_callback_class()(guard, main_process=getattr(args, "process_index", 0) == 0)
    trainer.add_callback(callback)
    original_step = trainer.training_step

    def training_step(*step_args, **step_kwargs):
        loss = original_step(*step_args, **step_kwargs)
        if callback.nonfinite is None:
            value = float(loss.detach().float().sum())
            if not math.isfinite(value):
                callback.nonfinite = value
        return loss

    trainer.training_step = training_step
    return callback


# ---------------------------------------------------------------------------------------------------------------
# disk errors
# ---------------------------------------------------------------------------------------------------------------
_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EROFS: "read-only file system"}
# libraries that wrap the OS error in their own exception (torch.save, safetensors) say so only in the text
_DISK_TEXT = (("no space left", errno.ENOSPC), ("storagefull", errno.ENOSPC), ("os error 28", errno.ENOSPC),
              ("file write failed", errno.ENOSPC), ("quota exceeded", errno.EDQUOT),
              ("read-only file system", errno.EROFS), ("permission denied", errno.EACCES))


def disk_error_message(exc: BaseException, writing: str | os.PathLike | None = None) -> str | None:
    """The one line for a full disk or an unwritable path, or None if `exc` is not one. `writing`: the staging dir
    the stage was writing (named when the error itself names no file)."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS else None
    if code is None and not isinstance(exc, OSError):
        text = str(exc).lower()
        squeezed = text.replace(" ", "")
        code = next((c for needle, c in _DISK_TEXT if needle in text or needle in squeezed), None)
    if code is None:
        return None
    path = getattr(exc, "filename", None) or writing or "the output dir"
    if code in (errno.ENOSPC, errno.EDQUOT):
        last = _last_checkpoint(Path(writing) / "checkpoints") if writing else None
        keep = (f"nothing was accepted; the last complete checkpoint, {last}, is kept: free space, then {RESUME_HINT}"
                if last else "nothing was accepted and no checkpoint was complete yet: free space, then rerun")
    else:
        keep = "fix the permissions of that path or choose another --output_dir"
    return f"{path}: {_DISK_ERRNOS[code]}; {keep}"
