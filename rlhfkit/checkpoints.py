"""The stage contract: what every stage writes, how it is made to appear atomically, how the next stage checks it.

A stage that writes `OUT` works in `OUT.partial/` (trainer checkpoints under `OUT.partial/checkpoints/`), writes
its weights, tokenizer, `metrics.json`, `args.yaml` and finally `run_info.json` there, then renames
`OUT.partial` to `OUT`. A run killed at any point leaves only `OUT.partial`, which carries the marker file
`INCOMPLETE` and is refused by `check_parent`; `--resume_from_checkpoint true` continues from its last checkpoint.

One run per directory: the main process holds `OUT.partial/LOCK` (an flock on it, released by the kernel when the
process dies; the file says pid, host, start time, command) from `StageOutput()` to the rename. A second run is
refused naming the holder; a lock file whose process is gone is reported and taken over only when resuming or
overwriting. `release_all` (called by `rlhfkit.cli.run_stage` when a stage ends) drops the locks and, after a
failure, removes a staging dir this process created that holds nothing but its markers, so bad input writes nothing.

`run_info.json` holds: stage, complete, toolkit version, arguments, parent checkpoint (path and stage), the model
name as asked and as resolved, dataset paths and fingerprint, final metrics, (reward models) the reward
mean/std on the training data for normalisation in PPO, and the run's `history` (its start and every resume, with
what changed). After it, `checksums.json` (size and sha256 of every file) is written last, in checkpoints too;
`check_parent` and the resume verify them, and a resume is compared with the run it continues
(`rlhfkit.integrity`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .errors import UserError
from .files import write_json_atomic, write_text_atomic
from .locks import LOCK_FILE, SHARED_STAGES, RunLock, release_held
from .integrity import CHECKSUMS, check_resume, collect_history, run_identity, verify_checksums, write_checksums

logger = logging.getLogger(__name__)

RUN_INFO = "run_info.json"
METRICS = "metrics.json"
ARGS_FILE = "args.yaml"
LOG_HISTORY = "log_history.jsonl"  # every logged step, one JSON object a line: Trainer stages and PPO
INCOMPLETE_MARKER = "INCOMPLETE"
CHECKPOINTS_SUBDIR = "checkpoints"
PARTIAL_SUFFIX = ".partial"
_WEIGHT_FILES = re.compile(r"^(model.*\.safetensors|pytorch_model.*\.bin|adapter_model\.safetensors)$")


def write_log_history(out_dir: str | os.PathLike, entries: list[dict]) -> None:
    """`OUT/log_history.jsonl`, written whole and atomically (`read_log_history` reads it back)."""
    write_text_atomic(Path(out_dir) / LOG_HISTORY, "".join(json.dumps(entry) + "\n" for entry in entries))


def read_log_history(out_dir: str | os.PathLike) -> list[dict]:
    """The entries of `OUT/log_history.jsonl` ([] when there is none); a torn last line (a run killed while
    appending) is skipped."""
    path = Path(out_dir) / LOG_HISTORY
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


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
    # one process per machine reads the bytes (--verify_parent); a damaged file stops it, and the launcher the rest
    verified = verify_checksums(path, what=f"{role} checkpoint") if _is_local_main_process() else "by another rank"
    return {"path": str(path), "stage": stage, "run_info": run_info, "verified": verified}


_OUTPUTS: list["StageOutput"] = []  # staging dirs this process is writing (for release_all)


def writing_dir() -> Path | None:
    """The staging dir this process is writing, if any (named in disk-error messages)."""
    return _OUTPUTS[-1].staging if _OUTPUTS else None


def release_all(failed: bool) -> None:
    """At the end of a stage process (`rlhfkit.cli.run_stage`): drop every lock this process holds. After a failure
    (bad input, a crash), a staging dir this process created that holds nothing but its markers is removed, so bad
    input leaves nothing behind; anything with checkpoints or rows in it is kept for resuming."""
    for output in list(_OUTPUTS):
        output.release(failed)
    release_held()


# ---------------------------------------------------------------------------------------------------------------
# writing a stage's output
# ---------------------------------------------------------------------------------------------------------------
def _is_main_process() -> bool:
    try:
        from .distributed import partial_state

        return partial_state().is_main_process
    except Exception:  # accelerate not initialised: a plain single process
        return True


def _is_local_main_process() -> bool:
    try:
        from .distributed import partial_state

        return partial_state().is_local_main_process
    except Exception:
        return True


def _wait_for_everyone() -> None:
    try:
        from .distributed import partial_state

        partial_state().wait_for_everyone()
    except Exception:
        pass


def _to_dict(*instances) -> dict:
    from .cli import to_dict

    return to_dict(*instances)


def resume_requested(value) -> bool:
    """Whether a `--resume_from_checkpoint` value (true/false/a path) asks to resume."""
    return value not in (None, "", "false", "False", "no", False)


class StageOutput:
    """Where a stage writes. Create it before training; call `finalize` after the weights are saved.

    `overwrite`: replace a complete `output_dir`. `resume`: keep `output_dir.partial` and its checkpoints.
    `output_dir` is kept as given: `finalize` writes it into args.yaml (whatever a Trainer's `output_dir` was
    pointed at meanwhile), so the saved arguments rerun into the same place.
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
        lock_path = Path(str(final) + PARTIAL_SUFFIX) / LOCK_FILE
        # only the main process takes the lock, so only it asks (the others would find the main process's lock)
        holder = RunLock.probe(lock_path) if _is_main_process() else None
        if holder is not None:
            raise UserError(f"{final}: another run is writing this output dir ({RunLock.describe(holder)}; lock file "
                            f"{lock_path}); wait for it to finish or choose another --output_dir")

    def __init__(self, output_dir: str | os.PathLike, stage: str, overwrite: bool = False, resume: bool = False):
        self.output_dir = str(output_dir)  # as the user gave it: what args.yaml records
        self.final = Path(str(output_dir).rstrip("/"))
        self.stage = stage
        self.staging = Path(str(self.final) + PARTIAL_SUFFIX)
        self.checkpoints = self.staging / CHECKPOINTS_SUBDIR
        self.lock: RunLock | None = None
        self.created = False  # this process made the staging dir (so a failure before any real output removes it)
        self.check_free(self.final, overwrite)
        if _is_main_process():
            try:
                self._prepare(overwrite, resume)
            except BaseException:
                self.release(failed=True)
                raise
            _OUTPUTS.append(self)
        _wait_for_everyone()

    def _prepare(self, overwrite: bool, resume: bool) -> None:
        existed = self.staging.exists()
        self.staging.mkdir(parents=True, exist_ok=True)
        self.created = not existed
        if self.stage not in SHARED_STAGES:
            self.lock = RunLock(self.staging / LOCK_FILE, what=f"{self.stage} run")
            self.lock.acquire(takeover=resume or overwrite, stage=self.stage, takeover_hint=(
                "pass --resume_from_checkpoint true to take over and continue it (training stages), or "
                "--overwrite_output_dir true to start over"))
        if existed and not resume:
            if self.last_checkpoint() is not None and not overwrite:
                raise UserError(
                    f"{self.staging}: an interrupted run left checkpoints here; pass "
                    f"--resume_from_checkpoint true to continue it or --overwrite_output_dir true to start over"
                )
            for entry in self.staging.iterdir():  # start over, keeping the lock we hold
                if entry.name == LOCK_FILE:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        (self.staging / INCOMPLETE_MARKER).write_text(
            "This directory is being written by a stage that has not finished.\n", encoding="utf-8"
        )

    def lock_shared(self, what: str = "merge") -> None:
        """For stages whose processes share OUT.partial (generation shards, each locking its own shard file): take
        the output lock for the step that only one process may do (the merge into OUT), like every other writer.
        A second merger is refused naming the first; a lock left by a killed merger is taken over (the merge starts
        again from the shards, which it removes only after writing the merged file)."""
        if not self.staging.is_dir():
            raise UserError(f"{self.staging}: gone: another process merged it into {self.final} meanwhile")
        lock = RunLock(self.staging / LOCK_FILE, what=f"{self.stage} {what}")
        try:
            lock.acquire(takeover=True, stage=f"{self.stage} {what}")
        except FileNotFoundError:  # the staging dir was renamed between the check and the lock
            raise UserError(f"{self.staging}: gone: another process merged it into {self.final} meanwhile") from None
        self.lock = lock

    def release(self, failed: bool = False) -> None:
        """Drop the lock. After a failure, remove the staging dir if this process created it and nothing but the
        markers is in it (bad input writes nothing); otherwise keep it for --resume_from_checkpoint."""
        if self in _OUTPUTS:
            _OUTPUTS.remove(self)
        if failed and self.created and self.staging.is_dir():
            try:
                entries = {entry.name: entry for entry in self.staging.iterdir()}
                empty_checkpoints = CHECKPOINTS_SUBDIR not in entries or not any(entries[CHECKPOINTS_SUBDIR].iterdir())
                if set(entries) <= {LOCK_FILE, INCOMPLETE_MARKER, CHECKPOINTS_SUBDIR} and empty_checkpoints:
                    shutil.rmtree(self.staging)
            except OSError:
                pass
        if self.lock is not None:
            self.lock.release()

    @classmethod
    def for_trainer(cls, training_args, stage: str, overwrite: bool = False, arguments: tuple = (), dataset=None,
                    model=None, tokenizer=None) -> tuple["StageOutput", str | None]:
        """Set up a HF-Trainer stage: staging dir, the checkpoint to resume from, Trainer checkpoints redirected into
        `OUT.partial/checkpoints/` (`training_args.output_dir` points there from now on, because the Trainer writes
        its checkpoints into it). Returns (output, resume_from); `output.output_dir` is the final output dir as the
        user gave it, and `finalize` writes that one into args.yaml, so stages have nothing to repair.

        The run's identity (`check_identity`): `arguments`, the stage's other parsed dataclasses (with
        `training_args`, every flag), `dataset` the training rows, `model` the resolved model path, `tokenizer`."""
        output = cls(training_args.output_dir, stage, overwrite=overwrite,
                     resume=resume_requested(training_args.resume_from_checkpoint))
        resume_from = output.resolve_resume(training_args.resume_from_checkpoint)
        output.check_identity(resume_from, (*arguments, training_args), dataset, model, tokenizer,
                              getattr(training_args, "world_size", 1))
        training_args.output_dir = str(output.checkpoints)
        return output, resume_from

    def check_identity(self, resuming_from: str | None, arguments: tuple | dict = (), dataset=None, model=None,
                       tokenizer=None, num_processes: int = 1, record: str | None = None) -> dict:
        """Record what this run is in the staging dir (`rlhfkit.integrity.run_identity`: `arguments`, the parsed
        dataclasses or a flat dict; `dataset`, the training rows; `model`, a path or several; `tokenizer`; the
        number of processes); when `resuming_from` a checkpoint (or the rows of an earlier run), first refuse, in
        one line, any result-changing difference from what the interrupted run recorded (`--allow_changed_args`
        lets named fields through). `record`: a name for one of several records in one dir (a generation shard).
        Every process compares; the main one writes. `arguments` may be a ready identity (a dict with "arguments")."""
        if isinstance(arguments, dict) and "arguments" in arguments:
            identity = arguments
        else:
            flat = arguments if isinstance(arguments, dict) else _to_dict(*arguments)
            identity = run_identity(flat, dataset, model, tokenizer, num_processes)
        name = f"run_identity.{record}.json" if record else "run_identity.json"
        # a named record (a shard) belongs to the process that writes that shard
        result = check_resume(self.staging, identity, resuming_from, self.stage, record_name=name,
                              write=bool(record) or _is_main_process())
        _wait_for_everyone()
        return result

    def last_checkpoint(self) -> str | None:
        """The `checkpoint-N` with the largest N under the staging dir, as HF Trainer names them."""
        if not self.checkpoints.is_dir():
            return None
        steps = []
        for entry in self.checkpoints.iterdir():
            match = re.fullmatch(r"checkpoint-(\d+)", entry.name)
            if not (match and entry.is_dir()):
                continue
            # Trainer writes trainer_state.json after the weights and optimizer, and we write checksums.json after
            # it: a checkpoint without them (or with a torn one, e.g. the disk filled up while writing it) was cut
            # short, and resuming from it fails, so fall back to the one before
            if _readable_json(entry / "trainer_state.json") and (entry / CHECKSUMS).is_file():
                steps.append((int(match.group(1)), entry))
            else:
                logger.warning("%s is incomplete (interrupted while saving); not resuming from it", entry)
        for _, entry in sorted(steps, reverse=True):  # the newest whole one: a damaged one is skipped by name
            try:
                verify_checksums(entry, what="checkpoint")
            except UserError as exc:
                logger.warning("%s; not resuming from it", exc)
                continue
            return str(entry)
        return None

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
        verify_checksums(resume_from_checkpoint, what="checkpoint")  # named by the user: damage is an error
        return resume_from_checkpoint

    def finalize(self, run_info: dict, metrics: dict | None = None, args: dict | None = None) -> Path:
        """Write metrics.json, args.yaml and run_info.json (last), then rename staging → final. Main process only.

        `args["output_dir"]`, when present, is recorded as this output's `output_dir` (see the class docstring)."""
        if _is_main_process():
            metrics = metrics or {}
            if args is not None and "output_dir" in args:
                args = {**args, "output_dir": self.output_dir}
            if args is not None:
                write_text_atomic(self.staging / ARGS_FILE, yaml.safe_dump(args, sort_keys=True))
            write_json_atomic(self.staging / METRICS, metrics)
            history = collect_history(self.staging)  # the run's start and resumes (removes the identity records)
            files = sorted(
                name
                for name in os.listdir(self.staging)
                if (self.staging / name).is_file() and name not in (INCOMPLETE_MARKER, LOCK_FILE)
                and not name.startswith(".")
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
            if history is not None:
                info["history"] = history
            write_json_atomic(self.staging / RUN_INFO, info)
            # last: the size and sha256 of every file (Trainer checkpoints under checkpoints/ have their own)
            write_checksums(self.staging, skip={INCOMPLETE_MARKER, LOCK_FILE}, skip_dirs={CHECKPOINTS_SUBDIR})
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
            # the lock moved with the dir (still held: nobody can take OUT.partial meanwhile); drop it now
            if self.lock is not None:
                self.lock.moved_to(self.final / LOCK_FILE)
            self.release()
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


def _paths(value) -> list[str]:
    return [value] if isinstance(value, (str, os.PathLike)) else [str(path) for path in value or []]


def trainer_run_info(data_args, model_args, model_record: dict, tokenizer, pad_action: str, train_rows,
                     data_report: dict, /, **dataset_extra) -> dict:
    """The run_info.json keys every Trainer stage (rm, sft, dpo) shares, written one way: where it started
    (`parent`, `model`: `parent_record`), what it trained on (`dataset`: paths, eval_paths, the fingerprint of the
    training rows, the loader's report, plus the stage's own counts in `dataset_extra`) and how text became tokens
    (`tokenizer`: the chat template's source, what was done about the pad token). Stages add their own keys."""
    return {
        **parent_record(parent_from_model(model_record), model_args.model_name_or_path, model_record),
        "dataset": {"paths": _paths(data_args.dataset_path), "eval_paths": _paths(data_args.eval_dataset_path),
                    "fingerprint": fingerprint(train_rows), "report": data_report, **dataset_extra},
        "tokenizer": {"chat_template": tokenizer.init_kwargs.get("rlhfkit_chat_template_source"), "pad": pad_action},
    }


# ---------------------------------------------------------------------------------------------------------------
# saving the final weights
# ---------------------------------------------------------------------------------------------------------------


