"""The stage contract: what every stage writes, how it is made to appear atomically, how the next stage checks it.

A stage that writes `OUT` works in `OUT.partial/` (trainer checkpoints under `OUT.partial/checkpoints/`), writes
its weights, tokenizer, `metrics.json`, `args.yaml` and finally `run_info.json` there, then renames
`OUT.partial` to `OUT`. A run killed at any point leaves only `OUT.partial`, which carries the marker file
`INCOMPLETE` and is refused by `check_parent`; `--resume_from_checkpoint true` continues from its last checkpoint.

`run_info.json` holds: stage, complete, toolkit version, arguments, parent checkpoint (path and stage), the model
name as asked and as resolved, dataset paths and fingerprint, final metrics, and (reward models) the reward
mean/std on the training data for normalisation in PPO.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .errors import UserError

logger = logging.getLogger(__name__)

RUN_INFO = "run_info.json"
METRICS = "metrics.json"
ARGS_FILE = "args.yaml"
LOG_HISTORY = "log_history.json"
INCOMPLETE_MARKER = "INCOMPLETE"
CHECKPOINTS_SUBDIR = "checkpoints"
PARTIAL_SUFFIX = ".partial"
_WEIGHT_FILES = re.compile(r"^(model.*\.safetensors|pytorch_model.*\.bin|adapter_model\.safetensors)$")


# ---------------------------------------------------------------------------------------------------------------
# atomic small files
# ---------------------------------------------------------------------------------------------------------------
def default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON to a temp file in the same directory and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, default_file_mode())  # mkstemp makes 0600 files; outputs should read like any other file
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, default_file_mode())
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def fingerprint(payload: Any) -> str:
    """Short, stable content hash of JSON-serialisable data (datasets, argument sets)."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# reading a parent
# ---------------------------------------------------------------------------------------------------------------
def read_run_info(path: str | os.PathLike) -> dict | None:
    file = Path(path) / RUN_INFO
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{file}: not valid JSON (the directory is damaged; rerun the stage that wrote it)") from None


def check_parent(path: str | os.PathLike, role: str = "model", expect_stage: str | tuple[str, ...] | None = None) -> dict:
    """Refuse an incomplete or missing parent checkpoint; return `{"path", "stage", "run_info"}`.

    Accepts our complete stage dirs and plain Hugging Face dirs (a `config.json` and weights, no `run_info.json`,
    e.g. a model the user downloaded). Refuses our `.partial` dirs, dirs with the `INCOMPLETE` marker, dirs whose
    `run_info.json` says incomplete, and dirs whose weights are missing.
    """
    path = Path(path)
    if not path.exists():
        partial = Path(str(path).rstrip("/") + PARTIAL_SUFFIX)
        if partial.exists():
            raise UserError(
                f"{path}: {role} checkpoint does not exist; {partial} is what an interrupted run left "
                f"(rerun that stage with --resume_from_checkpoint true)"
            )
        raise UserError(f"{path}: {role} checkpoint not found")
    if not path.is_dir():
        raise UserError(f"{path}: {role} checkpoint must be a directory")
    if (path / INCOMPLETE_MARKER).exists() or str(path).rstrip("/").endswith(PARTIAL_SUFFIX):
        raise UserError(f"{path}: {role} checkpoint is incomplete (the run that wrote it did not finish)")
    run_info = read_run_info(path)
    if run_info is not None and not run_info.get("complete", False):
        raise UserError(f"{path}: {role} checkpoint is incomplete (run_info.json says complete=false)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: {role} checkpoint has no config.json")
    weights = [name for name in os.listdir(path) if _WEIGHT_FILES.match(name)]
    if not weights:
        raise UserError(f"{path}: {role} checkpoint has no weight files (model*.safetensors)")
    if run_info is not None:
        for name in run_info.get("files", []):
            if not (path / name).is_file():
                raise UserError(f"{path}: {role} checkpoint is missing '{name}', listed in run_info.json")
    stage = run_info.get("stage") if run_info else None
    if expect_stage is not None and stage is not None:
        allowed = (expect_stage,) if isinstance(expect_stage, str) else expect_stage
        if stage not in allowed:
            raise UserError(f"{path}: expected a {' or '.join(allowed)} checkpoint for {role}, found a '{stage}' one")
    return {"path": str(path), "stage": stage, "run_info": run_info}


# ---------------------------------------------------------------------------------------------------------------
# writing a stage's output
# ---------------------------------------------------------------------------------------------------------------
def _is_main_process() -> bool:
    try:
        from .distributed import partial_state

        return partial_state().is_main_process
    except Exception:  # accelerate not initialised: a plain single process
        return True


def _wait_for_everyone() -> None:
    try:
        from .distributed import partial_state

        partial_state().wait_for_everyone()
    except Exception:
        pass


def resume_requested(value) -> bool:
    """Whether a `--resume_from_checkpoint` value (true/false/a path) asks to resume."""
    return value not in (None, "", "false", "False", "no", False)


class StageOutput:
    """Where a stage writes. Create it before training; call `finalize` after the weights are saved.

    `overwrite`: replace a complete `output_dir`. `resume`: keep `output_dir.partial` and its checkpoints.
    """

    @staticmethod
    def check_free(output_dir: str | os.PathLike, overwrite: bool = False) -> None:
        """Fail early (before loading models or data) if `output_dir` holds a run and overwriting was not asked."""
        final = Path(str(output_dir).rstrip("/"))
        if final.exists() and not overwrite:
            info = read_run_info(final)
            state = "a complete" if info and info.get("complete") else "an existing"
            raise UserError(
                f"{final}: output dir already holds {state} run; pass --overwrite_output_dir true "
                f"or choose another --output_dir"
            )

    def __init__(self, output_dir: str | os.PathLike, stage: str, overwrite: bool = False, resume: bool = False):
        self.final = Path(str(output_dir).rstrip("/"))
        self.stage = stage
        self.staging = Path(str(self.final) + PARTIAL_SUFFIX)
        self.checkpoints = self.staging / CHECKPOINTS_SUBDIR
        self.check_free(self.final, overwrite)
        if _is_main_process():
            if self.staging.exists() and not resume:
                if self.last_checkpoint() is not None and not overwrite:
                    raise UserError(
                        f"{self.staging}: an interrupted run left checkpoints here; pass "
                        f"--resume_from_checkpoint true to continue it or --overwrite_output_dir true to start over"
                    )
                shutil.rmtree(self.staging)
            self.staging.mkdir(parents=True, exist_ok=True)
            (self.staging / INCOMPLETE_MARKER).write_text(
                "This directory is being written by a stage that has not finished.\n", encoding="utf-8"
            )
        _wait_for_everyone()

    @classmethod
    def for_trainer(cls, training_args, stage: str, overwrite: bool = False) -> tuple["StageOutput", str | None, str]:
        """Set up a HF-Trainer stage: staging dir, the checkpoint to resume from, Trainer checkpoints redirected into
        `OUT.partial/checkpoints/`. Returns (output, resume_from, the final output dir as the user gave it)."""
        final_output_dir = training_args.output_dir
        output = cls(final_output_dir, stage, overwrite=overwrite,
                     resume=resume_requested(training_args.resume_from_checkpoint))
        resume_from = output.resolve_resume(training_args.resume_from_checkpoint)
        training_args.output_dir = str(output.checkpoints)
        return output, resume_from, final_output_dir

    def last_checkpoint(self) -> str | None:
        """The `checkpoint-N` with the largest N under the staging dir, as HF Trainer names them."""
        if not self.checkpoints.is_dir():
            return None
        steps = []
        for entry in self.checkpoints.iterdir():
            match = re.fullmatch(r"checkpoint-(\d+)", entry.name)
            if not (match and entry.is_dir()):
                continue
            # Trainer writes trainer_state.json after the weights and optimizer: a checkpoint without it was cut
            # short by the kill, and resuming from it fails, so fall back to the one before
            if (entry / "trainer_state.json").is_file():
                steps.append((int(match.group(1)), entry))
            else:
                logger.warning("%s is incomplete (interrupted while saving); not resuming from it", entry)
        return str(max(steps)[1]) if steps else None

    def resolve_resume(self, resume_from_checkpoint: str | None) -> str | None:
        """Map the user's `--resume_from_checkpoint` (true/false/path) onto a checkpoint dir or None."""
        if not resume_requested(resume_from_checkpoint):
            return None
        if resume_from_checkpoint in ("true", "True", "yes", "last"):
            last = self.last_checkpoint()
            if last is None:
                logger.warning("--resume_from_checkpoint: no checkpoint in %s; starting from scratch", self.checkpoints)
            return last
        if not Path(resume_from_checkpoint).is_dir():
            raise UserError(f"{resume_from_checkpoint}: --resume_from_checkpoint is not a directory")
        return resume_from_checkpoint

    def finalize(self, run_info: dict, metrics: dict | None = None, args: dict | None = None) -> Path:
        """Write metrics.json, args.yaml and run_info.json (last), then rename staging → final. Main process only."""
        if _is_main_process():
            metrics = metrics or {}
            if args is not None:
                write_text_atomic(self.staging / ARGS_FILE, yaml.safe_dump(args, sort_keys=True))
            write_json_atomic(self.staging / METRICS, metrics)
            files = sorted(
                name
                for name in os.listdir(self.staging)
                if (self.staging / name).is_file() and name != INCOMPLETE_MARKER and not name.startswith(".")
            )
            info = {
                "stage": self.stage,
                "complete": True,
                "toolkit_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **run_info,
                "metrics": metrics,
                "files": files,
            }
            if args is not None:
                info.setdefault("arguments", args)
            write_json_atomic(self.staging / RUN_INFO, info)
            (self.staging / INCOMPLETE_MARKER).unlink()
            if self.checkpoints.is_dir() and not any(self.checkpoints.iterdir()):
                self.checkpoints.rmdir()
            if self.final.exists():  # --overwrite_output_dir: swap, then delete the old run
                old = Path(f"{self.final}.old-{os.getpid()}")
                os.replace(self.final, old)
                os.replace(self.staging, self.final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.staging, self.final)
            logger.info("wrote %s", self.final)
        _wait_for_everyone()
        return self.final


def parent_from_model(resolved: dict) -> dict | None:
    """The parent a stage names in run_info.json: the local checkpoint dir it started from (None for built-ins and
    hub ids), from the record `rlhfkit.models.resolve_model` returns."""
    if "parent_stage" not in resolved:
        return None
    return {"path": resolved["resolved_path"], "stage": resolved.get("parent_stage")}


def parent_record(parent: dict | None, requested: str | None = None, resolved: dict | None = None) -> dict:
    """What run_info.json says about where a stage started from."""
    record: dict[str, Any] = {}
    if parent is not None:
        record["parent"] = {"path": os.path.abspath(parent["path"]), "stage": parent.get("stage")}
    if requested is not None:
        record["model"] = {"requested": requested, **(resolved or {})}
    return record


# ---------------------------------------------------------------------------------------------------------------
# saving the final weights
# ---------------------------------------------------------------------------------------------------------------
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
        write_json_atomic(Path(out_dir) / LOG_HISTORY, trainer.state.log_history)
    accelerator.wait_for_everyone()
