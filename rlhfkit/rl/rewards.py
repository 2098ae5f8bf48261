"""Reward sources of the RL stage: reward models, labelers, and verifiable rewards, combined with weights.

Every source is one object with the same interface:

    source(inputs: RewardInputs) -> list[float]     one score per response
    source.name, source.stats (mean/std to normalise by, or None), source.describe() -> dict (for run_info.json)

`build_reward_sources` makes the list from the stage's flags, in this order: every `--reward_model_path`, then
every `--reward_fn`, weighted by `--reward_weights` in that same order (default 1 each). `--reward_fn` takes a
name of `BUILTIN_REWARDS` (verifiable rewards that read the prompt row's columns) or anything `rlhfkit.labelers`
loads (`vader`, `module:function`, `file.py:function`: `(prompts, responses) -> list[float]`).

Adding a kind of reward is one class (or function) with this interface plus one line: a `BUILTIN_REWARDS` entry for
a `--reward_fn` name, or one line in `build_reward_sources` for a new flag (e.g. a process reward model's path).

Every score goes through `checked_component`: a wrong length, a non-number or a non-finite value stops the run with
one line naming the reward source, the row of the batch and its prompt id.

The verifiable rewards:
- `exact_answer`: 1.0 when the response's final answer equals the row's `answer` column, else 0.0. The final
  answer is found by `extract_final_answer` (the rule is in its docstring) and compared by `answers_match`: numbers
  as numbers (`85`, `85.0`, `+85`, `1,000` = `1000`, `3/4` = `0.75`), anything else as case-folded text.
- `format`: 1.0 when `re.search(--format_regex, response)` matches, else 0.0 (TRL's `think_format_reward` is the
  same idea with a fixed pattern).
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import torch

from rlhfkit.checkpoints import check_parent
from rlhfkit.errors import UserError
from rlhfkit.scoring import RewardModelScorer

if TYPE_CHECKING:  # for annotations only
    from rlhfkit.args import ModelArguments

DEFAULT_FORMAT_REGEX = r"(?im)^\s*answer:[ \t]*\S[^\n]*\s*\Z"  # the last line is "Answer: <something>"


@dataclass
class RewardInputs:
    """What a reward source sees for one batch of B responses (prompt-major, as the rollout)."""

    prompts: list[list[dict]]  # [B] the prompt messages
    responses: list[str]  # [B] decoded responses (no special tokens)
    rows: list[dict]  # [B] the prompt rows: id, prompt and any extra columns kept by the loader (e.g. answer)
    lengths: list[int]  # [B] response length in tokens, the stop token included
    truncated: list[bool]  # [B] no stop token within --max_new_tokens


# ---------------------------------------------------------------------------------------------------------------
# verifiable rewards: answer extraction and comparison (pure)
# ---------------------------------------------------------------------------------------------------------------
NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?"
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_MARKER = re.compile(r"(?i)\banswer\b\s*(?:is\b|:|=)\s*")
_NUMBER = re.compile(NUMBER)


def extract_final_answer(response: str) -> str | None:
    """The final answer of a response, by the first rule that applies:

    1. the content of the last `\\boxed{...}`;
    2. after the last "answer:", "answer is" or "answer =" (any case): the first number on the rest of that line,
       else the rest of that line (stripped of spaces, `*`, `$` and a final period), if not empty;
    3. the last number anywhere in the response (the "flexible" GSM8K rule of lm-evaluation-harness);
    4. None (no answer: scored 0).
    """
    boxed = _BOXED.findall(response)
    if boxed:
        return boxed[-1].strip()
    markers = list(_MARKER.finditer(response))
    if markers:
        rest = response[markers[-1].end():].split("\n", 1)[0]
        number = _NUMBER.search(rest)
        if number:
            return number.group(0)
        text = rest.strip().strip("*$ ").rstrip(".").strip()
        if text:
            return text
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def parse_number(text: str) -> Fraction | None:
    """`text` as an exact number (Fraction), or None: `1,000`, `-3.5`, `+2`, `3/4`, `$12`, `85.` are numbers."""
    cleaned = text.strip().strip("$*").rstrip(".").replace(",", "").replace(" ", "")
    if not re.fullmatch(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?", cleaned):
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def normalize_text_answer(text: str) -> str:
    return " ".join(text.strip().strip("*$").rstrip(".").casefold().split())


def answers_match(predicted: str | None, reference) -> bool:
    """Numbers compared as numbers (exactly, as fractions), anything else as case-folded, space-normalised text."""
    if predicted is None:
        return False
    reference = str(reference)
    predicted_number, reference_number = parse_number(predicted), parse_number(reference)
    if predicted_number is not None and reference_number is not None:
        return predicted_number == reference_number
    return normalize_text_answer(predicted) == normalize_text_answer(reference)


class ExactAnswerReward:
    """1.0 when the response's final answer equals the row's `answer` (see the module docstring), else 0.0."""

    name = "exact_answer"
    stats = None

    def __init__(self, answer_field: str = "answer"):
        self.answer_field = answer_field

    def check_rows(self, rows: Sequence[dict], source: str) -> None:
        """Refuse a prompt set without the answer column before any training (one line naming the row)."""
        for number, row in enumerate(rows, start=1):
            value = row.get(self.answer_field)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise UserError(f"{source}: row {number} (id '{row.get('id')}'): field '{self.answer_field}': "
                                f"missing or empty (--reward_fn exact_answer compares the final answer with it)")

    def __call__(self, inputs: RewardInputs) -> list[float]:
        return [float(answers_match(extract_final_answer(response), row.get(self.answer_field)))
                for response, row in zip(inputs.responses, inputs.rows)]

    def describe(self) -> dict:
        return {"reward_fn": self.name, "answer_field": self.answer_field,
                "rule": "last \\boxed{}, else the first number after the last 'answer:/is', else the last number; "
                        "numbers compared as numbers"}


class FormatReward:
    """1.0 when the response matches `--format_regex` (`re.search`), else 0.0."""

    name = "format"
    stats = None

    def __init__(self, pattern: str = DEFAULT_FORMAT_REGEX):
        try:
            self.regex = re.compile(pattern)
        except re.error as exc:
            raise UserError(f"--format_regex '{pattern}': not a valid regular expression ({exc})") from None

    def __call__(self, inputs: RewardInputs) -> list[float]:
        return [float(self.regex.search(response) is not None) for response in inputs.responses]

    def describe(self) -> dict:
        return {"reward_fn": self.name, "regex": self.regex.pattern}


# name → factory(options): `options` is the stage's ScriptArguments (any object with the attributes a factory reads)
BUILTIN_REWARDS: dict[str, Callable[[object], object]] = {
    "exact_answer": lambda options: ExactAnswerReward(getattr(options, "answer_field", "answer")),
    "format": lambda options: FormatReward(getattr(options, "format_regex", DEFAULT_FORMAT_REGEX)),
}


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer_length: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13), as verl adds it to the reward
    (`verl/experimental/reward_loop/reward_manager/dapo.py` at b178a3cd: min(−(len − (L_max − L_cache)) / L_cache ·
    factor, 0)) and as TRL's `get_soft_overlong_punishment` (factor 1) computes it:

        0 if len ≤ L_max − L_cache;   −factor · (len − (L_max − L_cache)) / L_cache up to L_max

    lengths [B] response tokens (the stop token included, as verl's valid_response_length) → [B] (≤ 0). Lengths
    never exceed L_max here (generation stops there), so the paper's −1 branch beyond L_max cannot occur.
    """
    expected = max_length - buffer_length
    exceed = lengths.float() - expected
    return torch.clamp(-exceed / buffer_length * factor, max=0.0)


# ---------------------------------------------------------------------------------------------------------------
# labelers and reward models
# ---------------------------------------------------------------------------------------------------------------
class FunctionReward:
    """A labeler (`rlhfkit.labelers`: a built-in such as `vader`, or `module:function` / `file.py:function`) behind
    the reward-source interface; the annotation stage scores responses with the same objects."""

    stats = None

    def __init__(self, spec: str):
        from rlhfkit.labelers import load_labeler

        self.name = spec
        self.labeler = load_labeler(spec, flag="--reward_fn")

    def __call__(self, inputs: RewardInputs) -> list[float]:
        # the unchecked callable: checked_component names the row and the prompt id, which the labeler check cannot
        return self.labeler.labeler(inputs.prompts, inputs.responses)

    def describe(self) -> dict:
        return {"reward_fn": self.name, **self.labeler.info}


class ModelReward(RewardModelScorer):
    """A reward model scoring `prompt + [assistant: response text]` rendered with its own tokenizer and template
    (`rlhfkit.scoring.RewardModelScorer`, the one reward-model wrapper), plus the reward statistics PPO normalises by.

    Re-rendering (rather than feeding the policy's token ids) is what lets the RM have another tokenizer or chat
    template than the policy.
    """

    def __init__(self, path: str, model_args: ModelArguments, batch_size: int = 16, max_length: int | None = None):
        from rlhfkit.models import model_init_kwargs

        kwargs = model_init_kwargs(model_args)
        kwargs.pop("quantization_config", None)  # the frozen RM is not trained; keep its scores exact
        super().__init__(path, batch_size, max_length, progress=False, **kwargs)
        self.name = path
        self.info = check_parent(path, role="reward model")
        run_info = self.info["run_info"] or {}
        stats = run_info.get("reward_stats")
        self.stats = None
        if stats is not None:
            try:
                self.stats = {"mean": float(stats["mean"]), "std": float(stats["std"])}
            except (KeyError, TypeError, ValueError):
                raise UserError(
                    f"{path}/run_info.json: field 'reward_stats': expected {{'mean': x, 'std': y}}"
                ) from None

    def __call__(self, *args) -> list[float]:  # type: ignore[override]
        """`source(inputs: RewardInputs)`, or the labeler form `(prompts, responses)`."""
        prompts, responses = (args[0].prompts, args[0].responses) if len(args) == 1 else args
        return RewardModelScorer.__call__(self, prompts, responses)

    def describe(self) -> dict:
        return {"reward_model": os.path.abspath(self.path), "reward_stats": self.stats}


# ---------------------------------------------------------------------------------------------------------------
# the list of sources
# ---------------------------------------------------------------------------------------------------------------
def reward_model_source(path: str, options, model_args: ModelArguments | None):
    """The source for one `--reward_model_path`, by the checkpoint's kind (`--reward_model_type`, default from its
    run_info.json): a scalar reward model, a pairwise preference model or a process reward model
    (`rlhfkit/rl/model_rewards.py`). A new kind of reward model is one class there and one line here."""
    from rlhfkit.rl.model_rewards import PreferenceReward, ProcessReward, reward_model_kind

    batch_size, max_length = getattr(options, "rm_batch_size", 16), getattr(options, "rm_max_length", None)
    kind = reward_model_kind(path, getattr(options, "reward_model_type", "auto"))
    if kind == "pm":
        return PreferenceReward(path, batch_size, max_length, getattr(options, "pm_reward", "log_odds"))
    if kind == "prm":
        return ProcessReward(path, batch_size, max_length, getattr(options, "aggregate", "min"))
    if kind == "rm":
        return ModelReward(path, model_args, batch_size, max_length)
    raise ValueError(f"reward model kind '{kind}' has no reward source")


@dataclass
class WeightedReward:
    source: object  # a reward source (see the module docstring)
    weight: float
    key: str  # the metric name: reward/<key>
    flag: str  # the flag that asked for it, for error messages

    @property
    def label(self) -> str:
        return f"{self.flag} {self.source.name}"


def build_reward_sources(options, model_args: ModelArguments | None = None) -> list[WeightedReward]:
    """The weighted reward sources of `options` (`reward_model_path`, `reward_fn`, `reward_weights` lists, plus what
    the built-ins read, e.g. `format_regex`), in the documented order: reward models, then functions."""
    specs = [("--reward_model_path", path) for path in options.reward_model_path or []]
    specs += [("--reward_fn", name) for name in options.reward_fn or []]
    weights = list(options.reward_weights or [1.0] * len(specs))
    if len(weights) != len(specs):
        raise UserError(f"--reward_weights: {len(weights)} weights for {len(specs)} reward sources "
                        f"(order: every --reward_model_path, then every --reward_fn)")
    out, keys = [], set()
    for (flag, spec), weight in zip(specs, weights):
        if flag == "--reward_model_path":
            source = reward_model_source(spec, options, model_args)
            key = "rm_" + os.path.basename(os.path.normpath(spec))
        elif spec in BUILTIN_REWARDS:
            source, key = BUILTIN_REWARDS[spec](options), spec
        else:
            source = FunctionReward(spec)
            key = re.sub(r"[^A-Za-z0-9_.]+", "_", spec.rsplit(":", 1)[-1].rsplit("/", 1)[-1])
        base, number = key, 2
        while key in keys:  # the same function twice (e.g. two regexes) still logs two curves
            key, number = f"{base}_{number}", number + 1
        keys.add(key)
        out.append(WeightedReward(source, float(weight), key, flag))
    return out


def checked_component(raw, inputs: RewardInputs, label: str) -> torch.Tensor:
    """One source's output as a float tensor [B]; anything else is one line naming the source, the row and its
    prompt id."""
    count = len(inputs.responses)
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().flatten().tolist()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise UserError(f"{label}: must return a list of numbers, one per response, got {type(raw).__name__}")
    if len(raw) != count:
        raise UserError(f"{label}: returned {len(raw)} scores for {count} responses")
    values = []
    for row, value in enumerate(raw):
        where = f"{label}: row {row} of the batch (prompt id '{inputs.rows[row].get('id')}')"
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real):  # int, float, bool, numpy scalars; not None, str, lists
            raise UserError(f"{where}: score {value!r} is not a number")
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"{where}: score is {value} (scores must be finite)")
        values.append(value)
    return torch.tensor(values, dtype=torch.float32)


def score_components(sources: Sequence[WeightedReward], inputs: RewardInputs) -> dict[str, torch.Tensor]:
    """key → raw scores [B] of every source, checked."""
    if len(inputs.rows) != len(inputs.responses):
        raise ValueError(f"{len(inputs.rows)} rows for {len(inputs.responses)} responses")
    return {item.key: checked_component(item.source(inputs), inputs, item.label) for item in sources}


def combine(sources: Sequence[WeightedReward], components: dict[str, torch.Tensor],
            normalize_by_stats: bool) -> torch.Tensor:
    """Σ_i w_i · s_i over the sources ([B] each → [B]); with `normalize_by_stats` a source with `stats` (a reward
    model's run_info reward_stats) enters as (s_i − mean_i) / std_i, so sources on different scales add up."""
    total = None
    for item in sources:
        values = components[item.key]
        if normalize_by_stats and item.source.stats is not None:
            values = (values - item.source.stats["mean"]) / max(item.source.stats["std"], 1e-8)
        total = item.weight * values if total is None else total + item.weight * values
    return total
