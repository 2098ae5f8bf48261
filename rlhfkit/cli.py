"""Command-line plumbing shared by every stage: arguments from dataclasses, YAML configs, clean errors.

Precedence: dataclass defaults < `--config file.yaml` < command-line flags. Unknown keys are fatal in both the
YAML file and the command line (TRL's `fail_with_unknown_args=False` silently drops typos; we do not).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from .errors import UserError

logger = logging.getLogger("rlhfkit")


def _parser(dataclass_types: Sequence[type]):
    import argparse

    from transformers import HfArgumentParser

    main_module = sys.modules.get("__main__")
    description = getattr(main_module, "__doc__", None)  # the stage script's docstring heads its --help
    return HfArgumentParser(list(dataclass_types), description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)  # a prefix like --learning_rat must not pass as --learning_rate


def _known_keys(dataclass_types) -> set[str]:
    """Every flag name the stage takes: the fields of its argument dataclasses (what HfArgumentParser adds)."""
    import dataclasses

    return {f.name for dataclass_type in dataclass_types for f in dataclasses.fields(dataclass_type) if f.init}


def _suggest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# One flag name per concept across the stages. The old names keep working for one release (0.2) with a one-line
# note on stderr; a stage that still declares the old name itself (none should) keeps it untouched.
RENAMED_FLAGS = {
    "reward_name_or_path": "reward_model_path",
    "ref_model_name_or_path": "ref_model_path",
    "record_dir": "output_dir",
    "recipe": "mixture",
}


def _renamed(key: str, known: set[str], where: str) -> str:
    new = RENAMED_FLAGS.get(key)
    if new is None or key in known or new not in known:
        return key
    print(f"note: {where}'{key}' is deprecated, use '{new}' (the old name goes in rlhfkit 0.2)", file=sys.stderr)
    return new


def _rename_argv(argv: list[str], known: set[str]) -> list[str]:
    renamed = []
    for token in argv:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            token = f"--{_renamed(name, known, '')}{eq}{value}"
        renamed.append(token)
    return renamed


def _yaml_to_argv(path: str, known: set[str]) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f": line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: not valid YAML") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: a config file must be a mapping of argument names to values")
    argv: list[str] = []
    for key, value in config.items():
        key = _renamed(str(key), known, f"{path}: key ")
        if key not in known:
            raise UserError(f"{path}: unknown key '{key}'{_suggest(str(key), known)}")
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", "true" if value else "false"]
        elif isinstance(value, list):
            argv += [f"--{key}", *[str(item) for item in value]]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _machine_defaults(known: set[str], argv: list[str]) -> list[str]:
    """CPU-only machines run without extra flags: `use_cpu` is set there (bf16 is handled by
    `rlhfkit.args.TrainingDefaults`). Explicit flags always win."""
    import torch

    if torch.cuda.is_available():
        return []
    defaults = []
    if "use_cpu" in known and "--use_cpu" not in argv:
        # without it HF sizes DeepSpeed's global batch for one process while the launcher started several
        defaults += ["--use_cpu", "true"]
    return defaults


@dataclasses.dataclass
class IntegrityArguments:
    """Flags every stage takes (added by `parse_args`, applied process-wide by `rlhfkit.integrity.configure`, not
    passed to `main`): how hard to check the files a stage is about to trust, and what a resume may change."""

    verify_parent: str = dataclasses.field(
        default="full",
        metadata={"help": "Check a parent checkpoint (and a checkpoint resumed from) against its checksums.json "
                  "before using it: full (size and sha256 of every file: ~3 s of CPU for a 1B-parameter fp32 model), "
                  "size (sizes only), none."},
    )
    allow_changed_args: list[str] = dataclasses.field(
        default=None,
        metadata={"help": "With --resume_from_checkpoint (or a rerun of generation shards): fields that may differ "
                  "from the interrupted run although they change the result (argument names, or dataset, model, "
                  "tokenizer, num_processes, toolkit_version); recorded in run_info.json."},
    )


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple:
    """Parse `argv` (default: `sys.argv[1:]`) into one instance per dataclass type.

    `--config path.yaml` may appear anywhere; its keys are the same names as the flags. The flags of
    `IntegrityArguments` are parsed too and applied process-wide; they are not returned.
    """
    from .integrity import configure

    dataclass_types = [*dataclass_types, IntegrityArguments]
    parser = _parser(dataclass_types)
    known = _known_keys(dataclass_types)
    argv = _rename_argv(list(sys.argv[1:] if argv is None else argv), known)
    config_argv: list[str] = []
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise UserError("--config needs a YAML file path")
        config_argv = _yaml_to_argv(argv[index + 1], known)
        argv = argv[:index] + argv[index + 2 :]
    defaults = _machine_defaults(known, config_argv + argv)
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(
            args=defaults + config_argv + argv, return_remaining_strings=True
        )
    except (ValueError, TypeError) as exc:  # raised by dataclass __post_init__ validation
        raise UserError(str(exc)) from None
    if remaining:
        flag = remaining[0]
        name = flag.lstrip("-").split("=")[0]
        raise UserError(f"unknown argument '{flag}'{_suggest(name, known)}; see --help")
    *parsed, integrity = parsed
    configure(integrity.verify_parent, integrity.allow_changed_args or ())
    return tuple(parsed)


def to_dict(*instances) -> dict[str, Any]:
    """Flatten parsed dataclasses into one JSON-serialisable dict (what run_info.json and args.yaml record)."""
    out: dict[str, Any] = {}
    for instance in instances:
        if hasattr(instance, "to_dict"):  # TrainingArguments drops private and deprecated fields itself
            values = instance.to_dict()
        else:
            values = dataclasses.asdict(instance)
        for key, value in values.items():
            if key.startswith("_"):
                continue
            try:
                json.dumps(value)
            except TypeError:
                value = str(value)
            # keep args.yaml re-runnable with --config: argparse wants ≥ 1 value for a list flag, and
            # TrainingArguments.to_dict writes `<PAD_TOKEN>`-style placeholders for every `*_token` field
            if value == [] or (key.endswith("_token") and value == f"<{key.upper()}>"):
                continue
            out[key] = value
    return out


def setup_logging(main_process: bool = True) -> None:
    level = logging.INFO if main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    for noisy in ("datasets", "httpx", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # load reports ("layers were not sharded", "score.weight MISSING" for a new reward head) are expected here
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    logging.getLogger("transformers.distributed.tensor_parallel").setLevel(logging.ERROR)
    # transformers' own handler keeps the stderr of the moment it was made (a closed one, for a stage run twice in
    # one process under captured output): route its records through the root handler made just above instead
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    except ImportError:
        pass


def require(module: str, feature: str, extra: str | None = None) -> None:
    """Fail with one line when an optional dependency (GPU-only extras) is missing."""
    if importlib.util.find_spec(module) is None:
        hint = f"pip install 'rlhfkit[{extra}]'" if extra else f"pip install {module}"
        raise UserError(f"{feature} needs the '{module}' package, which is not installed ({hint})")


def require_reporters(report_to) -> None:
    """`--report_to wandb` without wandb installed fails deep inside Trainer with a traceback; fail here, one line."""
    for name in ([report_to] if isinstance(report_to, str) else report_to or []):
        if name in ("wandb", "tensorboard"):
            require(name, f"--report_to {name}", extra=name)


def require_cuda(feature: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{feature} needs a CUDA GPU and none is visible to this process")


def run_stage(main: Callable[..., Any], dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> None:
    """Entry point of every stage script: parse, run `main(*parsed)`, turn `UserError` into one line + exit 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # transformers 5 warns on every run that TRL's configs still carry `gradient_checkpointing`; it is not actionable
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    from .checkpoints import release_all, writing_dir
    from .faults import Preempted, disk_error_message, uninstall_all

    try:
        parsed = parse_args(dataclass_types, argv)
        main(*parsed)
    except UserError as exc:
        uninstall_all()
        release_all(failed=True)  # bad input writes nothing: a staging dir holding only markers goes
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Preempted as exc:  # the checkpoint is saved and the line printed; keep OUT.partial for the resume
        uninstall_all()
        from .launch import record_preemption

        record_preemption(str(exc))  # for `python -m rlhfkit.launch`, which then exits 75 instead of the launcher's 1
        release_all(failed=False)
        sys.exit(exc.code)
    except Exception as exc:
        uninstall_all()
        message = disk_error_message(exc, writing_dir())
        release_all(failed=True)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except BaseException:  # KeyboardInterrupt and the like: keep what was written, drop the locks
        uninstall_all()
        release_all(failed=False)
        raise
    uninstall_all()
    release_all(failed=False)
