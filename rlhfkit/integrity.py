"""What makes a checkpoint, a parent and a resumed run trustworthy: checksums of every file, the identity of a run.

**Checksums** (`checksums.json`, the size and sha256 of every file under a directory). Written last and atomically
into every Trainer checkpoint (`rlhfkit.faults`' callback, after all ranks have written their files), every PPO
checkpoint (`rlhfkit.rl.ppo.save_checkpoint`) and every finished stage output (`StageOutput.finalize`, after
run_info.json, before the rename). Checked:
- by `check_parent` (every stage that accepts a parent, through `rlhfkit.models.resolve_model`) with the mode of
  `--verify_parent full|size|none` (a flag every stage takes, `rlhfkit.cli`); `full` re-reads every byte;
- by `StageOutput.last_checkpoint` on `--resume_from_checkpoint true`: a damaged checkpoint is skipped by name, as a
  torn one is, and the one before it is used.
A damaged file is one line naming the file, its expected and its actual size or digest. A directory without
checksums.json (a plain Hugging Face download, or an output of a toolkit version without them) is accepted as it
is, with a log line saying it was not verified.

Cost (measured on the 2-core development machine, README "Resume and verification"): `full` is sha256 over every
byte, 0.75 s of CPU per GB (1.34 GB/s, SHA-NI), so ~3 s of CPU for a 1B-parameter fp32 file (4 GB); 14-16 s wall
clock there while the two cores were shared by ~12 runnable processes. `size` is one `stat` per file (0.3 ms).

**Run identity** (`OUT.partial/run_identity*.json`, folded into run_info.json's `history` when the stage finishes).
A stage records, when it starts, what makes its result: every argument, the fingerprint of its training rows, of its
model (config, tokenizer files and weights: their sha256 from the parent's checksums.json when it has one, else
their names and sizes) and of its tokenizer (vocabulary, special tokens, chat template), the number of processes
and the toolkit's version. On `--resume_from_checkpoint` the new invocation is compared with that record: any
difference outside `SAFE_CHANGES` is refused with one line listing every differing field, old → new;
`--allow_changed_args FIELD …` lets the named fields through on purpose. Every resume, with what changed and why
it was allowed, is appended to the history. Nothing is a "result-neutral" default: a field is safe only by being
named in `SAFE_CHANGES` (denylist-free).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .errors import UserError

logger = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
VERIFY_MODES = ("full", "size", "none")
# full: a 1B-parameter fp32 parent costs ~3 s of CPU once per stage (measured, README), small next to loading it
# (which reads the same bytes) and to any training on it; a damaged file trusted costs the whole run
DEFAULT_VERIFY = "full"
_CHUNK = 8 << 20


# ---------------------------------------------------------------------------------------------------------------
# process-wide settings (from the flags every stage takes, `rlhfkit.cli.IntegrityArguments`)
# ---------------------------------------------------------------------------------------------------------------
_SETTINGS: dict[str, Any] = {"verify": DEFAULT_VERIFY, "allow": ()}
_VERIFIED: dict[tuple, str] = {}  # (dir, mode, checksums.json mtime and size) → outcome, so a parent is read once


def configure(verify_parent: str = DEFAULT_VERIFY, allow_changed_args: list[str] | tuple = ()) -> None:
    if verify_parent not in VERIFY_MODES:
        raise UserError(f"--verify_parent must be one of {', '.join(VERIFY_MODES)}, not '{verify_parent}'")
    _SETTINGS["verify"] = verify_parent
    _SETTINGS["allow"] = tuple(allow_changed_args or ())


def verify_mode() -> str:
    return _SETTINGS["verify"]


def allowed_changes() -> tuple[str, ...]:
    return _SETTINGS["allow"]


# ---------------------------------------------------------------------------------------------------------------
# checksums
# ---------------------------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listed_files(directory: Path, skip: frozenset[str], skip_dirs: frozenset[str]) -> list[str]:
    """Relative paths of the files under `directory`, sorted; hidden entries (temp files of atomic writes),
    `skip` names and top-level `skip_dirs` left out."""
    out = []
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (rel_root == Path(".") and d in skip_dirs))
        for name in files:
            if name.startswith(".") or name in skip or name == CHECKSUMS:
                continue
            out.append(str(rel_root / name) if rel_root != Path(".") else name)
    return sorted(out)


def write_checksums(directory: str | os.PathLike, skip: set[str] | frozenset = frozenset(),
                    skip_dirs: set[str] | frozenset = frozenset()) -> dict:
    """Hash every file under `directory` and write `checksums.json` there atomically (call it last). Returns it."""
    from .files import write_json_atomic

    directory = Path(directory)
    files = {}
    for name in _listed_files(directory, frozenset(skip), frozenset(skip_dirs)):
        path = directory / name
        files[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    record = {"algorithm": "sha256", "files": files}
    write_json_atomic(directory / CHECKSUMS, record)
    return record


def read_checksums(directory: str | os.PathLike) -> dict | None:
    file = Path(directory) / CHECKSUMS
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(record.get("files"), dict):
            raise ValueError
        return record
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{file}: not a valid checksums file (the directory is damaged)") from None


def _stat_or_none(path: Path):
    try:
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns, stat.st_ino
    except OSError:
        return None


def verify_checksums(directory: str | os.PathLike, mode: str | None = None, what: str = "checkpoint") -> str:
    """Check every file listed in `directory/checksums.json` (mode `full`: size and sha256; `size`: size only;
    `none`: nothing). Raises one line naming the first damaged or missing file; returns what was done, for the log
    and run_info.json: 'full', 'size', 'none' or 'no checksums'."""
    mode = mode or verify_mode()
    if mode not in VERIFY_MODES:
        raise UserError(f"--verify_parent must be one of {', '.join(VERIFY_MODES)}, not '{mode}'")
    directory = Path(directory)
    if mode == "none":
        return "none"
    file = directory / CHECKSUMS
    try:
        stat = file.stat()
    except OSError:
        logger.info("%s: no %s (written before checksums, or not by this toolkit): %s not verified", directory,
                    CHECKSUMS, what)
        return "no checksums"
    record = read_checksums(directory)
    # once per process for unchanged files (a policy that is also the reference is read once)
    key = (os.path.abspath(directory), mode, stat.st_mtime_ns, tuple(_stat_or_none(directory / name)
                                                                    for name in sorted(record["files"])))
    if key in _VERIFIED:
        return _VERIFIED[key]
    for name, expected in sorted(record["files"].items()):
        path = directory / name
        try:
            size = path.stat().st_size
        except OSError:
            raise UserError(f"{path}: missing, but listed in {file} ({what} damaged or copied in part)") from None
        if size != expected["size"]:
            raise UserError(f"{path}: damaged: size {size} bytes, expected {expected['size']} ({file}); "
                            f"copy the {what} again or rerun the stage that wrote it")
        if mode == "full":
            actual = file_sha256(path)
            if actual != expected["sha256"]:
                raise UserError(f"{path}: damaged: sha256 {actual}, expected {expected['sha256']} ({file}); "
                                f"copy the {what} again or rerun the stage that wrote it")
    _VERIFIED[key] = mode
    return mode


# ---------------------------------------------------------------------------------------------------------------
# run identity
# ---------------------------------------------------------------------------------------------------------------
# Fields that may differ on resume without changing what the run computes, and how:
#   "longer": only upwards (the run goes on for longer). With a decaying learning-rate schedule the remaining steps
#             follow the new length's schedule from where the run is (the rate jumps to where the longer run would
#             be at this step); recorded, because the result is then neither the old nor a fresh run of the new length.
#   "any":    logging, saving and evaluation cadence, reporting, thread and worker counts: they change when things
#             are written or how fast, not the weights.
#   "cadence": "any", unless the run keeps its best checkpoint (`load_best_model_at_end`): then which steps are
#             evaluated and saved decides the result, and a change is refused like any other.
SAFE_CHANGES: dict[str, str] = {
    "max_steps": "longer", "num_train_epochs": "longer",
    **dict.fromkeys(("logging_steps", "logging_strategy", "logging_first_step", "logging_dir", "logging_nan_inf_filter",
                     "log_level", "log_level_replica", "log_on_each_node", "disable_tqdm", "report_to", "run_name",
                     "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
                     "skip_memory_metrics", "save_total_limit", "save_on_each_node", "preemption_signals",
                     "num_threads", "dataloader_num_workers", "dataloader_prefetch_factor",
                     "dataloader_persistent_workers", "dataloader_pin_memory", "dataset_num_proc", "ddp_timeout"),
                    "any"),
    **dict.fromkeys(("save_steps", "save_strategy", "eval_steps", "eval_strategy", "eval_delay", "eval_on_start"),
                    "cadence"),
}
# Per-stage additions: generation's samples do not depend on the batch (per-prompt seeds, generation/generate.py)
STAGE_SAFE_CHANGES: dict[str, dict[str, str]] = {
    "generate": {"batch_size": "any", "gpu_memory_utilization": "any"},
}
# Never compared: what the resume itself implies (the same output dir, resuming, this process's rank)
IMPLIED = frozenset({"output_dir", "resume_from_checkpoint", "overwrite_output_dir", "local_rank"})
IDENTITY_FIELDS = ("dataset", "model", "tokenizer", "num_processes", "toolkit_version")  # besides the arguments
IDENTITY_FILE = "run_identity.json"
# (log_history.json: what our Trainer stages wrote before log_history.jsonl, so older parents fingerprint the same)
_METADATA_FILES = frozenset({"run_info.json", "metrics.json", "args.yaml", "log_history.json", "log_history.jsonl",
                             "README.md", CHECKSUMS, "LOCK", "INCOMPLETE", "training_args.bin"})
_SMALL = 64 << 20  # files below this without a recorded digest are hashed for the model fingerprint


def model_fingerprint(path: str | os.PathLike | None) -> str | None:
    """What a model directory holds, in 16 hex digits: every file but run metadata and subdirs (config, tokenizer,
    generation config, weights), each by its sha256 from the directory's checksums.json when it has one, else by
    its own sha256 when small, else by its size. Cheap: nothing large is read. A hub id is its own fingerprint."""
    from .checkpoints import fingerprint

    if path is None:
        return None
    if isinstance(path, (list, tuple)):  # several models (DPO: the policy and its reference)
        return fingerprint([model_fingerprint(one) for one in path])
    directory = Path(path)
    if not directory.is_dir():
        return fingerprint({"hub_id": str(path)})
    recorded = {}
    if (directory / CHECKSUMS).is_file():
        recorded = {name: entry["sha256"] for name, entry in read_checksums(directory)["files"].items()}
    files = {}
    for entry in sorted(directory.iterdir()):
        if not entry.is_file() or entry.name.startswith(".") or entry.name in _METADATA_FILES:
            continue
        size = entry.stat().st_size
        files[entry.name] = recorded.get(entry.name) or (file_sha256(entry) if size < _SMALL else f"{size} bytes")
    return fingerprint(files)


def tokenizer_fingerprint(tokenizer) -> str | None:
    """The tokenizer as it encodes: vocabulary, special tokens, chat template, padding and truncation sides."""
    from .checkpoints import fingerprint

    if tokenizer is None:
        return None
    return fingerprint({"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens,
                        "pad": tokenizer.pad_token, "chat_template": getattr(tokenizer, "chat_template", None),
                        "padding_side": tokenizer.padding_side, "truncation_side": tokenizer.truncation_side})


def run_identity(arguments: dict, dataset=None, model=None, tokenizer=None, num_processes: int = 1) -> dict:
    """What the run is: `arguments` (the flattened flags, `rlhfkit.cli.to_dict`), the fingerprint of `dataset` (the
    training rows as loaded) with their count, `model` (a model dir or hub id, or several), `tokenizer` (the loaded one), the
    number of processes (the world size: it sets the global batch) and the toolkit's version."""
    from . import __version__
    from .checkpoints import fingerprint

    rows = None if dataset is None else f"{fingerprint(dataset)} ({len(dataset)} rows)"
    return {"arguments": {k: v for k, v in sorted(arguments.items()) if k not in IMPLIED}, "dataset": rows,
            "model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer),
            "num_processes": int(num_processes), "toolkit_version": __version__}


def _flat(identity: dict) -> dict:
    return {**identity.get("arguments", {}), **{k: identity.get(k) for k in IDENTITY_FIELDS}}


def _longer(old, new) -> bool:
    try:
        return float(old) > 0 and float(new) > float(old)
    except (TypeError, ValueError):
        return False


def compare_identities(old: dict, new: dict, stage: str | None = None, allowed: tuple | list = ()) -> dict:
    """Sort every field that differs between two identities: {"safe": {...}, "allowed": {...}, "refused": {...}},
    each `field → [old, new]`. `allowed`: the fields of `--allow_changed_args`."""
    rules = {**SAFE_CHANGES, **STAGE_SAFE_CHANGES.get(stage or "", {})}
    before, after = _flat(old), _flat(new)
    keeps_best = bool(before.get("load_best_model_at_end")) or bool(after.get("load_best_model_at_end"))
    out: dict[str, dict] = {"safe": {}, "allowed": {}, "refused": {}}
    for name in sorted(set(before) | set(after)):
        if name in IMPLIED or before.get(name) == after.get(name):
            continue
        change = [before.get(name), after.get(name)]
        rule = rules.get(name)
        safe = (rule == "any" or (rule == "cadence" and not keeps_best)
                or (rule == "longer" and _longer(*change)))
        out["safe" if safe else "allowed" if name in allowed else "refused"][name] = change
    return out


def _show(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def check_resume(record_dir: str | os.PathLike, identity: dict, resuming_from: str | None, stage: str,
                 allowed: tuple | list | None = None, record_name: str = IDENTITY_FILE,
                 write: bool = True) -> dict:
    """Compare this invocation with the identity recorded in `record_dir` when resuming (`resuming_from` names the
    checkpoint or rows continued from), refuse result-changing differences in one line, and record the run's
    history. A fresh start (`resuming_from` None) records a new history. `write`: whether this process writes the
    record (the main process); every process compares, so every rank refuses alike. Returns the record."""
    from .files import write_json_atomic

    allowed = allowed_changes() if allowed is None else tuple(allowed)
    path = Path(record_dir) / record_name
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    previous = None
    if resuming_from is not None and path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{path}: not valid JSON (damaged); pass --overwrite_output_dir true to start over") from None
    if previous is None:
        if resuming_from is not None:
            logger.warning("%s: no identity was recorded by the run being resumed (an older toolkit version): the "
                           "arguments, data and model cannot be compared with it", path)
        record = {"identity": identity, "history": [{"event": "start", "at": now, **(
            {"resumed_from": str(resuming_from), "note": "no identity recorded before this resume"}
            if resuming_from is not None else {})}]}
    else:
        changes = compare_identities(previous["identity"], identity, stage, allowed)
        unknown = [name for name in allowed if name not in _flat(identity) and name not in _flat(previous["identity"])]
        if unknown:
            raise UserError(f"--allow_changed_args: unknown field(s) {', '.join(unknown)} (fields: the stage's "
                            f"argument names and {', '.join(IDENTITY_FIELDS)})")
        if changes["refused"]:
            listed = "; ".join(f"{name} {_show(old)} → {_show(new)}" for name, (old, new) in changes["refused"].items())
            raise UserError(
                f"--resume_from_checkpoint: this run is not the one that wrote {Path(record_dir)} ({listed}); resume "
                f"with the recorded settings, start over with --overwrite_output_dir true, or pass --allow_changed_args "
                f"{' '.join(changes['refused'])} to resume anyway (recorded in run_info.json)")
        for name, (old, new) in {**changes["safe"], **changes["allowed"]}.items():
            how = "safe" if name in changes["safe"] else "allowed by --allow_changed_args"
            logger.warning("resume: %s changed %s → %s (%s; recorded in run_info.json)", name, _show(old), _show(new),
                           how)
        entry = {"event": "resume", "at": now, "resumed_from": str(resuming_from),
                 "changed_safe": changes["safe"], "changed_allowed": changes["allowed"]}
        record = {"identity": identity, "history": [*previous.get("history", []), entry]}
    if write:
        write_json_atomic(path, record)
    return record


def collect_history(staging: str | os.PathLike) -> dict | None:
    """The identity records of a staging dir, removed from it, for run_info.json's `history`: one record (a training
    run) as `{"identity": fingerprints, "events": [start, resume, …]}`, several (generation shards) as
    `{"shards": {name: that}}`; None if there is none."""
    records = {}
    for file in sorted(Path(staging).glob("run_identity*.json")):
        try:
            records[file.stem] = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        file.unlink()
    if not records:
        return None

    def trimmed(record: dict) -> dict:  # the arguments are in run_info.json already
        return {"identity": {k: v for k, v in record["identity"].items() if k != "arguments"},
                "events": record.get("history", [])}

    if list(records) == [Path(IDENTITY_FILE).stem]:
        return trimmed(records[Path(IDENTITY_FILE).stem])
    return {"shards": {name.removeprefix("run_identity."): trimmed(record) for name, record in records.items()}}
