"""Public preference sources, row by row: one pure converter per source from the columns on its dataset card to a
canonical `Pair` (`to_row()` is `{"prompt", "chosen", "rejected", "source", "subset", "id"}`, docs/internals.md),
and the pairing of a prompt with several scored responses (best vs a random other, or all pairs).

Schema violations (a missing column, a wrong type) are `UserError`s naming file, row and field; a well-formed row
that cannot become a pair raises `Dropped(rule)` and is counted under that rule. Which sources exist, their hub
names and pinned revisions: `rlhfkit.mixtures.catalog`; the rules applied to the pairs afterwards: `rlhfkit.mixtures.selection`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from rlhfkit.data import RowError, is_valid_prompt, parse_hh_dialogue
from rlhfkit.errors import UserError, where
from rlhfkit.pairs import best_vs_random_other


# ---------------------------------------------------------------------------------------------------------------
# the pair a converter produces, and row-level drops
# ---------------------------------------------------------------------------------------------------------------
class Dropped(Exception):
    """Raised by a converter for a well-formed row that cannot become a pair; `rule` names the manifest counter."""

    def __init__(self, rule: str):
        super().__init__(rule)
        self.rule = rule


@dataclass
class Pair:
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    source: str
    id: str
    subset: str | None = None
    chosen_score: float | None = None
    rejected_score: float | None = None
    tie: bool = False  # the source rates both responses equally; orientation is then the source's own
    group: str | None = None  # what "per prompt" means for caps (SHP: post_id)
    score_ratio: float | None = None

    def to_row(self) -> dict:
        row: dict[str, Any] = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected,
                               "source": self.source}
        if self.subset is not None:
            row["subset"] = self.subset
        row["id"] = self.id
        return row


@dataclass
class ScoredResponse:
    text: str
    score: float | None  # None: the source has no usable rating for it
    tag: str  # for ids: position in its row (UltraFeedback) or the row key (HelpSteer)


@dataclass
class RankedPrompt:
    """One prompt with several scored responses (UltraFeedback row, HelpSteer prompt group)."""

    prompt: list[dict]
    responses: list[ScoredResponse]
    key: str  # stable identity for the seeded draw and for ids
    subset: str | None = None


@dataclass
class Record:
    path: str  # for error messages
    row: int  # 1-based position in that file, as in every error message
    data: dict
    subset: str | None = None
    file_number: int | None = None  # set when a source spans several files (row numbers then repeat)

    @property
    def key(self) -> str:
        """Unique within its source and stable across runs: ids and seeded draws are derived from it."""
        return str(self.row) if self.file_number is None else f"{self.file_number}.{self.row}"


# ---------------------------------------------------------------------------------------------------------------
# small validated accessors (schema violations are user errors naming file, row and field)
# ---------------------------------------------------------------------------------------------------------------
def required_field(row: dict, name: str, loc: tuple) -> Any:
    if not isinstance(row, dict):
        raise UserError(f"{where(*loc)}: expected a JSON object, found {type(row).__name__}")
    if name not in row:
        raise UserError(f"{where(*loc, name)}: missing (this source's rows need it; see its dataset card)")
    return row[name]


def _string(row: dict, name: str, loc: tuple) -> str:
    value = required_field(row, name, loc)
    if not isinstance(value, str):
        raise UserError(f"{where(*loc, name)}: expected a string, found {type(value).__name__}")
    return value


def _number(value: Any) -> float | None:
    """A finite float from an int/float/numeric string, else None ('N/A', NaN, None all mean 'no rating')."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _rating(row: dict, name: str, loc: tuple) -> float | None:
    value = required_field(row, name, loc)
    if value is not None and not isinstance(value, (int, float, str)):
        raise UserError(f"{where(*loc, name)}: expected a number, found {type(value).__name__}")
    return _number(value)


def _messages(value: Any, loc: tuple, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where(*loc, name)}: expected a non-empty list of {{role, content}} messages")
    out = []
    for position, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise UserError(f"{where(*loc, name)}: message {position} must be an object with string 'role' and 'content'")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def user_prompt(text: str, system: str | None = None) -> list[dict]:
    prompt = [{"role": "system", "content": system}] if system else []
    return prompt + [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------------------------------------------------------
# HH-RLHF raw-text dialogues
# ---------------------------------------------------------------------------------------------------------------
def _key(loc: tuple, key: str | None) -> str:
    return str(loc[1]) if key is None else key


def _split_dialogue(messages: list[dict]) -> tuple[list[dict], list[dict]] | None:
    """(prompt, final assistant turn) or None when the dialogue is not a valid prompt + one assistant reply."""
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        return None
    prompt = messages[:-1]
    return (prompt, messages[-1:]) if is_valid_prompt(prompt) else None


# ---------------------------------------------------------------------------------------------------------------
# per-row converters: pure functions of one source row
# ---------------------------------------------------------------------------------------------------------------
def convert_hh_rlhf(row: dict, loc: tuple, subset: str | None = None, key: str | None = None) -> Pair:
    """{"chosen": text, "rejected": text} → Pair; both texts share the dialogue up to the last assistant turn."""
    halves = []
    for name in ("chosen", "rejected"):
        text = _string(row, name, loc)
        try:
            messages = parse_hh_dialogue(text, name)
        except RowError:
            raise Dropped("unparseable_dialogue") from None
        split = _split_dialogue(messages)
        if split is None:
            raise Dropped("unparseable_dialogue")
        halves.append(split)
    (prompt, chosen), (rejected_prompt, rejected) = halves
    if prompt != rejected_prompt:
        raise Dropped("prompt_mismatch")
    return Pair(prompt, chosen, rejected, "hh-rlhf", f"hh-rlhf:{subset or 'local'}:{_key(loc, key)}", subset=subset)


def convert_shp(row: dict, loc: tuple, key: str | None = None) -> Pair:
    """SHP: labels == 1 means human_ref_A is preferred, 0 means human_ref_B (dataset card)."""
    post = _string(row, "history", loc)
    ref_a, ref_b = _string(row, "human_ref_A", loc), _string(row, "human_ref_B", loc)
    label = required_field(row, "labels", loc)
    if label not in (0, 1) or isinstance(label, bool):
        raise UserError(f"{where(*loc, 'labels')}: expected 0 or 1, found {label!r}")
    ratio = _rating(row, "score_ratio", loc)
    if ratio is None:
        raise UserError(f"{where(*loc, 'score_ratio')}: expected a number, found {row['score_ratio']!r}")
    post_id = str(required_field(row, "post_id", loc))
    domain = row.get("domain") if isinstance(row.get("domain"), str) else None
    chosen, rejected = (ref_a, ref_b) if label == 1 else (ref_b, ref_a)
    return Pair(user_prompt(post), _assistant(chosen), _assistant(rejected), "shp", f"shp:{post_id}:{_key(loc, key)}",
                subset=domain, group=post_id, score_ratio=ratio)


def _ultrafeedback_fine_grained(completion: dict) -> float | None:
    """The card's `fine-grained_score` (mean of the four aspect ratings); recomputed from the ratings if absent."""
    score = _number(completion.get("fine-grained_score"))
    if score is not None:
        return score
    annotations = completion.get("annotations")
    if not isinstance(annotations, dict):
        return None
    ratings = []
    for aspect in ("helpfulness", "honesty", "instruction_following", "truthfulness"):
        value = annotations.get(aspect)
        if isinstance(value, list):  # early revisions stored each aspect as a one-element list
            value = value[0] if value else None
        if isinstance(value, dict):
            rating = _number(value.get("Rating"))
            if rating is not None:
                ratings.append(rating)
    return sum(ratings) / len(ratings) if ratings else None


def convert_ultrafeedback(row: dict, loc: tuple, score: str = "fine_grained", key: str | None = None) -> RankedPrompt:
    instruction = _string(row, "instruction", loc)
    completions = required_field(row, "completions", loc)
    if not isinstance(completions, list):
        raise UserError(f"{where(*loc, 'completions')}: expected a list, found {type(completions).__name__}")
    responses = []
    for index, completion in enumerate(completions):
        if not isinstance(completion, dict) or not isinstance(completion.get("response"), str):
            raise UserError(f"{where(*loc, 'completions')}: completion {index} has no string 'response'")
        value = (_ultrafeedback_fine_grained(completion) if score == "fine_grained"
                 else _number(completion.get("overall_score")))
        responses.append(ScoredResponse(completion["response"], value, str(index)))
    subset = row.get("source") if isinstance(row.get("source"), str) else None
    return RankedPrompt(user_prompt(instruction), responses, key=_key(loc, key), subset=subset)


def convert_helpsteer(row: dict, loc: tuple, attributes: Sequence[str] = ("helpfulness", "correctness"),
                      key: str | None = None) -> tuple[str, ScoredResponse]:
    """One HelpSteer row → (prompt text, its response scored by the mean of `attributes`, 0-4 each)."""
    prompt = _string(row, "prompt", loc)
    response = _string(row, "response", loc)
    values = []
    for attribute in attributes:
        value = _rating(row, attribute, loc)
        if value is None:
            raise UserError(f"{where(*loc, attribute)}: expected a 0-4 rating, found {row[attribute]!r}")
        values.append(value)
    return prompt, ScoredResponse(response, sum(values) / len(values), _key(loc, key))


def convert_capybara(row: dict, loc: tuple, key: str | None = None) -> Pair:
    """Chosen/rejected are whole conversations that differ only in the last assistant turn (dataset card)."""
    chosen_conv = _messages(required_field(row, "chosen", loc), loc, "chosen")
    rejected_conv = _messages(required_field(row, "rejected", loc), loc, "rejected")
    rating_chosen, rating_rejected = _rating(row, "rating_chosen", loc), _rating(row, "rating_rejected", loc)
    chosen_split, rejected_split = _split_dialogue(chosen_conv), _split_dialogue(rejected_conv)
    if chosen_split is None or rejected_split is None:
        raise Dropped("malformed_dialogue")
    if chosen_split[0] != rejected_split[0]:
        raise Dropped("prompt_mismatch")
    if rating_chosen is None or rating_rejected is None:
        raise Dropped("unrated")
    return Pair(chosen_split[0], chosen_split[1], rejected_split[1], "capybara", f"capybara:{_key(loc, key)}",
                chosen_score=rating_chosen, rejected_score=rating_rejected, tie=rating_chosen == rating_rejected)


def convert_orca(row: dict, loc: tuple, key: str | None = None) -> Pair:
    """`rating` holds the judge's two scores (null for ~40 rows); `status` is 'tie', 'unchanged' or 'swapped'."""
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise UserError(f"{where(*loc, 'system')}: expected a string, found {type(system).__name__}")
    prompt = user_prompt(_string(row, "input", loc), system or None)
    chosen, rejected = _string(row, "chosen", loc), _string(row, "rejected", loc)
    rating = required_field(row, "rating", loc)
    if rating is None:
        raise Dropped("unrated")
    if not isinstance(rating, (list, tuple)) or len(rating) != 2:
        raise UserError(f"{where(*loc, 'rating')}: expected two ratings [a, b] or null, found {rating!r}")
    scores = [_number(value) for value in rating]
    if None in scores:
        raise Dropped("unrated")
    high, low = max(scores), min(scores)
    tie = high == low or row.get("status") == "tie"
    return Pair(prompt, _assistant(chosen), _assistant(rejected), "orca", f"orca:{_key(loc, key)}",
                chosen_score=high, rejected_score=low, tie=tie)


def convert_pku(row: dict, loc: tuple, preference: str = "safer", label: str = "pku-saferlhf",
                key: str | None = None) -> Pair:
    """`safer`: chosen = response[safer_response_id]; `better`: the more helpful one; `agree`: only rows where
    the two labels pick the same response (the others are dropped as 'better_safer_disagree')."""
    responses = (_string(row, "response_0", loc), _string(row, "response_1", loc))
    ids = {}
    for name in ("better_response_id", "safer_response_id"):
        value = required_field(row, name, loc)
        if isinstance(value, bool) or value not in (0, 1):
            raise UserError(f"{where(*loc, name)}: expected 0 or 1, found {value!r}")
        ids[name] = int(value)
    if preference == "agree" and ids["better_response_id"] != ids["safer_response_id"]:
        raise Dropped("better_safer_disagree")
    chosen_id = ids["better_response_id"] if preference == "better" else ids["safer_response_id"]
    prompt = user_prompt(_string(row, "prompt", loc))
    return Pair(prompt, _assistant(responses[chosen_id]), _assistant(responses[1 - chosen_id]), label,
                f"{label}:{_key(loc, key)}")


# ---------------------------------------------------------------------------------------------------------------
# pair formation from ranked prompts
# ---------------------------------------------------------------------------------------------------------------
def seeded_rng(seed: int, *parts: Any) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`, so the stream does not depend on PYTHONHASHSEED.
    return random.Random(":".join(str(part) for part in (seed, *parts)))


def _make_pair(ranked: RankedPrompt, better: ScoredResponse, worse: ScoredResponse, source: str) -> Pair:
    return Pair(ranked.prompt, _assistant(better.text), _assistant(worse.text), source,
                f"{source}:{ranked.key}:{better.tag}-{worse.tag}", subset=ranked.subset,
                chosen_score=better.score, rejected_score=worse.score, tie=better.score == worse.score)


def pairs_best_vs_random(ranked: RankedPrompt, source: str, seed: int, ties: str = "drop") -> list[Pair]:
    """One pair: the best-scored response vs one drawn from the rest. Unscored responses take no part.

    The draw is `pairs.best_vs_random_other`, the rule annotate's `--pair_strategy max_random` uses too. What differs
    is the tie rule and the seed: here a draw that ties with the best is handled by the `ties` option downstream
    (`drop`, the published rule, via `selection.drop_ties`; `keep`; or `resample`: drawn among strictly worse
    responses when there are any) and the generator is seeded by (seed, source, prompt key); annotate always drops
    a tied draw (`ties` in its counts) and seeds by `derive_seed(seed, prompt id)`."""
    scores = [response.score for response in ranked.responses]
    drawn = best_vs_random_other(scores, seeded_rng(seed, source, ranked.key), strictly_worse=ties == "resample")
    if drawn is None:
        return []
    best, other = drawn
    return [_make_pair(ranked, ranked.responses[best], ranked.responses[other], source)]


def pairs_all(ranked: RankedPrompt, source: str) -> list[Pair]:
    """All C(n, 2) pairs of scored responses, the higher score as chosen (the earlier one on a tie)."""
    scored = [response for response in ranked.responses if response.score is not None]
    pairs = []
    for first, second in combinations(scored, 2):
        better, worse = (second, first) if second.score > first.score else (first, second)
        pairs.append(_make_pair(ranked, better, worse, source))
    return pairs
