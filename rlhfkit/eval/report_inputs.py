"""What the demo report reads: named generation outputs, a stage's training log and its curves, a reward
model's held-out accuracy (`rlhfkit.eval.report`)."""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.errors import UserError

# Training-curve keys worth plotting, in order of preference; at most MAX_CURVES per stage.
CURVE_KEYS = (
    "loss", "eval_loss", "eval_accuracy", "rewards/accuracies", "rewards/margins",  # Trainer stages (RM, DPO)
    "reward/raw", "kl/k1", "policy/pg_loss", "value/loss",  # ppo_train.py's log_history.jsonl
    "accuracy", "objective/kl", "kl", "reward", "entropy",
)
MAX_CURVES = 4


def parse_named(values: list[str], flag: str, default_names: bool = False) -> "OrderedDict[str, str]":
    """['name=path', ...] → {name: path}. With `default_names`, a bare path is named by its last component."""
    out: OrderedDict[str, str] = OrderedDict()
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            if not default_names:
                raise UserError(f"--{flag} '{value}': expected name=path")
            name, path = Path(value.rstrip("/")).name, value
        if not name or not path:
            raise UserError(f"--{flag} '{value}': expected name=path")
        if name in out:
            raise UserError(f"--{flag}: the name '{name}' is given twice")
        out[name] = path
    return out


@dataclass
class Generations:
    name: str
    path: str
    ids: list[str]
    prompts: list[list[dict]]
    responses: list[list[str]]


def load_generations(name: str, path: str) -> Generations:
    """Rows `{"id", "prompt": [...], "responses": [str, ...]}` (generation/generate.py; extra fields ignored), read by
    `rlhfkit.generations.read_generations` (its validation, its id rule)."""
    from rlhfkit.generations import read_generations

    rows = read_generations(path)
    return Generations(name, path, [row["id"] for row in rows], [row["prompt"] for row in rows],
                       [row["responses"] for row in rows])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_log_history(stage_dir: str | os.PathLike) -> list[dict]:
    """The training log of a stage output: our stages' `log_history.jsonl` (`rlhfkit.checkpoints.LOG_HISTORY`),
    else a Hugging Face Trainer's `trainer_state.json` (an output of another tool), else the newest
    `checkpoints/checkpoint-N/trainer_state.json` (a run that stopped before the end)."""
    from rlhfkit.checkpoints import read_log_history as read_ours

    stage_dir = Path(stage_dir)
    entries = read_ours(stage_dir)
    if entries:
        return entries
    checkpoints = sorted(glob.glob(str(stage_dir / "checkpoints" / "checkpoint-*" / "trainer_state.json")),
                         key=lambda p: int(re.search(r"checkpoint-(\d+)", p).group(1)))
    for state in [stage_dir / "trainer_state.json", *map(Path, reversed(checkpoints))]:
        payload = _read_json(state)
        history = payload.get("log_history") if isinstance(payload, dict) else None
        if isinstance(history, list) and any(isinstance(e, dict) for e in history):
            return [e for e in history if isinstance(e, dict)]
    return []


def curve_series(log_history: list[dict]) -> "OrderedDict[str, tuple[list[float], list[float]]]":
    """key → (steps, values) for the preferred numeric keys with at least two points (in CURVE_KEYS order)."""
    series: OrderedDict[str, tuple[list[float], list[float]]] = OrderedDict()
    for key in CURVE_KEYS:
        steps, values = [], []
        for index, entry in enumerate(log_history):
            value = entry.get(key)
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                steps.append(float(entry.get("step", entry.get("global_step", index))))
                values.append(float(value))
        if len(values) >= 2:
            series[key] = (steps, values)
        if len(series) == MAX_CURVES:
            break
    return series


def final_values(log_history: list[dict]) -> "OrderedDict[str, float]":
    """The last logged value of each CURVE_KEYS key (also for keys logged once, which have no curve)."""
    out: OrderedDict[str, float] = OrderedDict()
    for key in CURVE_KEYS:
        for entry in reversed(log_history):
            value = entry.get(key)
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                out[key] = value
                break
    return out


def read_rm_accuracy(path: str) -> dict[str, float]:
    """Accuracy numbers from an eval/rm output dir or a metrics JSON file.

    Top-level keys containing "accuracy" when there are any (eval_benchmark's `accuracy`, rm_train's
    `eval_accuracy`); otherwise every nested one, flattened to `a/b` keys.
    """
    file = Path(path)
    payloads = []
    if file.is_dir():
        for name in ("metrics.json", "results.json", "run_info.json"):
            payload = _read_json(file / name)
            if isinstance(payload, dict):
                payloads.append(payload.get("metrics", payload) if name == "run_info.json" else payload)
    elif file.is_file():
        payloads.append(_read_json(file))
    else:
        raise UserError(f"{path}: --rm_eval not found")
    found: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if key != "log_history":
                    walk(f"{prefix}/{key}" if prefix else str(key), inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and "accuracy" in prefix.lower():
            found.setdefault(prefix, float(value))

    for payload in payloads:
        if isinstance(payload, dict):
            for key, value in payload.items():
                if "accuracy" in str(key).lower() and isinstance(value, (int, float)) and not isinstance(value, bool):
                    found.setdefault(str(key), float(value))
    if not found:
        for payload in payloads:
            if isinstance(payload, dict):
                walk("", payload)
    if not found:
        raise UserError(f"{path}: no accuracy in its metrics (expected e.g. 'accuracy' or 'eval_accuracy')")
    return found
