"""Labelers: anything that scores responses, behind one interface used by `annotate/` and `ppo_train.py`.

A labeler is a callable

    labeler(prompts: list[list[dict]], responses: list[str]) -> list[float]

`prompts[i]` is the conversation (messages ending with a user turn) that `responses[i]` answers; the result has one
finite float per response, higher is better. `load_labeler(spec)` accepts:

- a built-in name: `vader` (below);
- a reward-model directory (an `rm_train.py` output or any `*ForSequenceClassification` checkpoint): the response
  appended to its prompt as an assistant turn, rendered with the RM's own chat template, scored by
  `rlhfkit.scoring.RewardModelScorer` (the one reward-model wrapper);
- an import path `package.module:name` or `path/to/file.py:name`, naming a labeler callable, or a class / factory
  that takes no arguments and returns one. This is how a user plugs in their own AI-feedback rater.

Every labeler returned by `load_labeler` is wrapped so that a wrong number of scores or a non-finite score is a
one-line `UserError` naming the labeler, not a silent misalignment of rewards and responses. `labeler.info` is a
dict describing it, recorded in run_info.json by the stages.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import UserError
from .scoring import RewardModelScorer

logger = logging.getLogger(__name__)

Labeler = Callable[[list[list[dict]], list[str]], list[float]]


class VaderLabeler:
    """VADER sentiment (Hutto & Gilbert, ICWSM 2014) as a stand-in for a human rater: the compound score in [-1, 1].

    Only the response is scored; the prompt is ignored (VADER measures the tone of a text, not its fit to a request).
    It is rule-based and deterministic: a lexicon of ~7,500 rated words plus rules for negation, intensifiers,
    "but", capitals and punctuation, bundled in the MIT-licensed `vadersentiment` package. On tweets its
    compound score correlates ≈ 0.87 with human sentiment ratings, on product reviews ≈ 0.59.
    """

    name = "vader"

    def __init__(self):
        from .cli import require

        require("vaderSentiment", "the 'vader' labeler", extra="demo")
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()
        try:
            from importlib.metadata import version

            package_version = version("vadersentiment")
        except Exception:  # metadata missing in an unusual install: the record just lacks the version
            package_version = None
        self.info = {"labeler": "vader", "kind": "builtin", "package": "vadersentiment",
                     "version": package_version, "score": "compound sentiment of the response, in [-1, 1]"}

    def score(self, text: str) -> float:
        return float(self._analyzer.polarity_scores(text)["compound"])

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        return [self.score(text) for text in responses]


class RewardModelLabeler(RewardModelScorer):
    """A trained reward model as a labeler (the RM-annotation step of iterative DPO and best-of-K): the shared
    `rlhfkit.scoring.RewardModelScorer`, under the labeler interface's name."""

    name = "reward-model"


BUILTIN_LABELERS: dict[str, Callable[[], Labeler]] = {
    "vader": VaderLabeler,
}


class CheckedLabeler:
    """Wraps a labeler: validates its inputs and outputs so a faulty plug-in fails loudly and in one line."""

    def __init__(self, labeler: Labeler, spec: str, info: dict | None = None):
        self.labeler = labeler
        self.spec = spec
        self.info = info or getattr(labeler, "info", None) or {"labeler": spec, "kind": "import"}

    def __call__(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"labeler '{self.spec}': got {len(prompts)} prompts for {len(responses)} responses")
        if not responses:
            return []
        scores = self.labeler([list(prompt) for prompt in prompts], list(responses))
        try:
            scores = [float(score) for score in scores]
        except (TypeError, ValueError):
            raise UserError(f"labeler '{self.spec}': must return a list of numbers, one per response") from None
        if len(scores) != len(responses):
            raise UserError(
                f"labeler '{self.spec}': returned {len(scores)} scores for {len(responses)} responses"
            )
        bad = next((i for i, score in enumerate(scores) if not math.isfinite(score)), None)
        if bad is not None:
            raise UserError(f"labeler '{self.spec}': score {bad} is {scores[bad]} (scores must be finite)")
        return scores


def _import_object(spec: str, flag: str = "--labeler") -> Any:
    """`package.module:name` or `path/to/file.py:name` → the object."""
    module_part, _, attr = spec.rpartition(":")
    if not module_part or not attr:
        raise UserError(f"{flag} '{spec}': expected a built-in name ({', '.join(BUILTIN_LABELERS)}), "
                        f"a reward-model directory, or 'module:function'")
    if module_part.endswith(".py"):
        if not os.path.isfile(module_part):
            raise UserError(f"{flag} '{spec}': file {module_part} not found")
        module_name = f"rlhfkit_user_labeler_{Path(module_part).stem}"
        loader_spec = importlib.util.spec_from_file_location(module_name, module_part)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise UserError(f"{flag} '{spec}': cannot import module '{module_part}' ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"{flag} '{spec}': module '{module_part}' has no attribute '{attr}'") from None


def load_labeler(spec: str, flag: str = "--labeler", tournament: str = "round_robin",
                 **reward_model_kwargs) -> CheckedLabeler:
    """A labeler from a built-in name, a reward-model directory or an import path (see the module docstring).

    `flag` is the option the user typed (errors name it: `--labeler` in annotate/, `--reward_fn` in PPO).
    `reward_model_kwargs` (batch_size, max_length, device) apply to reward-model directories only; a pairwise
    preference-model directory (pm_train.py) ranks the responses sharing a prompt by `tournament`
    (rlhfkit.preference_model.PreferenceModelScorer).
    """
    if not spec:
        raise UserError(f"{flag} is required (e.g. 'vader', a reward-model directory, or 'module:function')")
    if spec in BUILTIN_LABELERS:
        labeler = BUILTIN_LABELERS[spec]()
        return CheckedLabeler(labeler, spec, labeler.info)
    if os.path.isdir(spec) or os.path.isdir(spec.rstrip("/") + ".partial"):
        from .preference_model import PreferenceModelScorer, is_preference_model

        if is_preference_model(spec):
            labeler = PreferenceModelScorer(spec, tournament=tournament, **reward_model_kwargs)
            return CheckedLabeler(labeler, spec, labeler.info)
        labeler = RewardModelLabeler(spec, **reward_model_kwargs)
        return CheckedLabeler(labeler, spec, labeler.info)
    if ":" not in spec:
        raise UserError(f"{flag} '{spec}': not a built-in labeler ({', '.join(BUILTIN_LABELERS)}), "
                        f"not an existing directory, and not 'module:function'")
    target = _import_object(spec, flag)
    if isinstance(target, type):  # a class: instantiate it with no arguments
        target = target()
    if not callable(target):
        raise UserError(f"{flag} '{spec}': {type(target).__name__} is not callable")
    info = getattr(target, "info", None) or {"labeler": spec, "kind": "import"}
    return CheckedLabeler(target, spec, info)
