"""Preference-data recipes: the named reward-model training mixtures, built from their public sources.

Every source has one pure per-row converter from the schema on its dataset card to the canonical pair schema
(`docs/internals.md`): a `Pair` whose `to_row()` is `{"prompt", "chosen", "rejected", "source", "subset", "id"}`.
Selection rules are separate pure functions over lists of pairs, so each can be tested on a hand-made list.
`build_source` runs converter → rules for one source and fills a `SourceReport` (the manifest entry);
`RECIPES` names the four published mixtures (RLHFlow reward-modeling README, versions 1-4).

Written by hand because no library does it: `datasets` loads the sources but knows none of their semantics
(which completion is better, what a tie is, what a comparison per prompt means).

Sources (hub name → what the converter reads):
  hh_rlhf            Anthropic/hh-rlhf                    chosen, rejected: "\\n\\nHuman: …\\n\\nAssistant: …" texts
  shp                stanfordnlp/SHP                      post_id, history, human_ref_A/B, labels, score_ratio
  ultrafeedback      openbmb/UltraFeedback                instruction, completions[{response, fine-grained_score,
                                                          overall_score, annotations{aspect{Rating}}}]
  helpsteer          nvidia/HelpSteer                     prompt, response, helpfulness, correctness, ... (one row per
                                                          response; rows with the same prompt are grouped)
  capybara           argilla/distilabel-capybara-dpo-7k-binarized   chosen/rejected message lists, rating_chosen/_rejected
  orca               argilla/distilabel-intel-orca-dpo-pairs        system, input, chosen, rejected, rating [a, b], status
  pku_saferlhf_30k   PKU-Alignment/PKU-SafeRLHF-30K       prompt, response_0/1, better_response_id, safer_response_id
  pku_saferlhf       PKU-Alignment/PKU-SafeRLHF           same columns
  lmflow             a local LMFlow {"instances": [{"positive", "negative"}]} file (see rlhfkit.lmflow)

Revisions: every hub source is loaded at a pinned revision (`SourceSpec.revision`, overridable with
`prepare_data.py --hub_revision key=rev`), and manifest.json records the revision asked for and the commit it
resolved to. PKU-SafeRLHF is pinned to 'v0', its first release (the one mixture4's "150K samples" come from; the
current 'main' holds about half that); the others to 'main', because neither their dataset cards nor RLHFlow's
README identify the revision the mixtures were built from. A recipe that asks a source for more pairs than it holds
(`pku_max_pairs`) stops with both numbers, or warns loudly under `--allow_short_sources true`.

Assumptions (where the published description leaves a choice):
  - A row that breaks its schema (missing column, wrong type) is a user error; a well-formed row whose content is
    unusable (dialogue that does not alternate, chosen/rejected prompts that differ, no rating) is dropped and
    counted under a named rule, because the public datasets contain a few such rows.
  - HH-RLHF "all of base, rejection-sampled and online" means the three helpful-* subsets (their train splits sum
    hold 118,263 rows; the published 115,547 is what remains after removing chosen == rejected).
  - "Best vs a random other": the best is the first completion with the top score; the other is drawn uniformly
    from the remaining ones with a generator seeded by (seed, source, row), so the draw of one prompt does not depend
    on any other prompt. A draw that ties with the best is dropped (`ties=drop`, the published rule), kept
    (`ties=keep`) or redrawn among strictly worse completions (`ties=resample`).
  - Per-prompt caps (SHP) keep a seeded random subset of each post's comparisons by default (`shp_select`).
  - Orca and Capybara already orient chosen/rejected by rating; a tie is equal ratings (or Orca's status "tie").
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from itertools import combinations
from pathlib import Path
from typing import Any

from .data import RowError, is_valid_prompt, parse_hh_dialogue, read_records
from .errors import UserError, where

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# sources, options, recipes
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceSpec:
    key: str  # flag prefix: --<key>_path
    label: str  # value of the `source` field in the output
    hub_name: str | None
    revision: str | None = None  # the hub revision loaded (branch, tag or commit); see `revision_note`
    revision_note: str = ""  # why this revision


_CURRENT = ("not identifiable from the dataset card (no release tags; RLHFlow's README names no revision): the "
            "current branch 'main' is named, and the commit it resolves to is recorded in manifest.json")
SOURCES: dict[str, SourceSpec] = {
    spec.key: spec
    for spec in (
        SourceSpec("hh_rlhf", "hh-rlhf", "Anthropic/hh-rlhf", "main", _CURRENT),
        SourceSpec("shp", "shp", "stanfordnlp/SHP", "main", _CURRENT),
        SourceSpec("ultrafeedback", "ultrafeedback", "openbmb/UltraFeedback", "main", _CURRENT),
        SourceSpec("helpsteer", "helpsteer", "nvidia/HelpSteer", "main", _CURRENT),
        SourceSpec("capybara", "capybara", "argilla/distilabel-capybara-dpo-7k-binarized", "main", _CURRENT),
        SourceSpec("orca", "orca", "argilla/distilabel-intel-orca-dpo-pairs", "main", _CURRENT),
        SourceSpec("pku_saferlhf_30k", "pku-saferlhf-30k", "PKU-Alignment/PKU-SafeRLHF-30K", "main", _CURRENT),
        SourceSpec("pku_saferlhf", "pku-saferlhf", "PKU-Alignment/PKU-SafeRLHF", "v0",
                   "the first release (~297K train rows), kept on the hub as revision 'v0' (the current dataset card "
                   "calls it PKU-SafeRLHF-v0 and links tree/v0); RLHFlow's mixture4 (early 2024) takes 150K pairs, "
                   "which only this release holds: the June 2024 re-release on 'main' has ~74K train rows"),
        SourceSpec("lmflow", "lmflow", None),
    )
}

HH_HELPFUL_SUBSETS = ("helpful-base", "helpful-online", "helpful-rejection-sampled")
PAIRINGS = ("best_vs_random", "all_pairs")
TIE_POLICIES = ("drop", "keep", "resample")
SHP_SELECTS = ("random", "max_ratio", "first")
PKU_PREFERENCES = ("safer", "better", "agree")
UF_SCORES = ("fine_grained", "overall")
HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


@dataclass(frozen=True)
class SelectionOptions:
    """Every selection knob. The defaults are the rules shared by all four recipes; recipes override a few."""

    hh_rlhf_subsets: tuple[str, ...] = HH_HELPFUL_SUBSETS
    shp_min_score_ratio: float = 2.0  # keep score_ratio > this (strict, as published)
    shp_max_pairs_per_prompt: int | None = None  # None: no cap
    shp_select: str = "random"
    ultrafeedback_score: str = "fine_grained"
    ultrafeedback_pairing: str = "best_vs_random"
    helpsteer_attributes: tuple[str, ...] = ("helpfulness", "correctness")
    helpsteer_pairing: str = "best_vs_random"
    ties: str = "drop"
    pku_preference: str = "safer"
    pku_max_pairs: int | None = None  # None: all

    def __post_init__(self):
        checks = [
            ("shp_select", self.shp_select, SHP_SELECTS),
            ("ultrafeedback_score", self.ultrafeedback_score, UF_SCORES),
            ("ultrafeedback_pairing", self.ultrafeedback_pairing, PAIRINGS),
            ("helpsteer_pairing", self.helpsteer_pairing, PAIRINGS),
            ("ties", self.ties, TIE_POLICIES),
            ("pku_preference", self.pku_preference, PKU_PREFERENCES),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}, not '{value}'")
        for attribute in self.helpsteer_attributes:
            if attribute not in HELPSTEER_ATTRIBUTES:
                raise UserError(
                    f"--helpsteer_attributes: '{attribute}' is not a HelpSteer attribute ({', '.join(HELPSTEER_ATTRIBUTES)})"
                )
        if not self.helpsteer_attributes:
            raise UserError("--helpsteer_attributes needs at least one attribute")
        if self.shp_max_pairs_per_prompt is not None and self.shp_max_pairs_per_prompt < 1:
            raise UserError("--shp_max_pairs_per_prompt must be >= 1 (leave it unset for no cap)")
        if self.pku_max_pairs is not None and self.pku_max_pairs < 1:
            raise UserError("--pku_max_pairs must be >= 1 (leave it unset for all pairs)")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    sources: tuple[str, ...]
    options: dict[str, Any]
    published_counts: dict[str, int]  # what the RLHFlow README reports per source, for the manifest


_MIXTURE_SOURCES = ("hh_rlhf", "shp", "ultrafeedback", "helpsteer", "capybara", "orca")
_MIXTURE1_COUNTS = {"hh_rlhf": 115547, "shp": 55916, "ultrafeedback": 62793, "helpsteer": 8206, "capybara": 7562,
                    "orca": 6405}
_MIXTURE2_COUNTS = {**_MIXTURE1_COUNTS, "shp": 109526, "ultrafeedback": 267416, "helpsteer": 21576}
_MIXTURE2_OPTIONS = {"shp_max_pairs_per_prompt": 5, "ultrafeedback_pairing": "all_pairs", "helpsteer_pairing": "all_pairs"}

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            "mixture1",
            "RLHFlow version 1 (~250K pairs): HH-RLHF helpful subsets without chosen == rejected; SHP score ratio > 2, "
            "one comparison per post; UltraFeedback and HelpSteer best vs a random other, ties dropped; Capybara "
            "and Orca without tied ratings",
            _MIXTURE_SOURCES,
            {"shp_max_pairs_per_prompt": 1, "ultrafeedback_pairing": "best_vs_random",
             "helpsteer_pairing": "best_vs_random"},
            _MIXTURE1_COUNTS,
        ),
        Recipe(
            "mixture2",
            "RLHFlow version 2: as mixture1 but SHP at most 5 comparisons per post, UltraFeedback and HelpSteer all "
            "6 pairs per prompt, ties dropped",
            _MIXTURE_SOURCES,
            dict(_MIXTURE2_OPTIONS),
            _MIXTURE2_COUNTS,
        ),
        Recipe(
            "mixture3",
            "RLHFlow version 3: mixture2 + the train split of PKU-SafeRLHF-30K (safer response chosen)",
            _MIXTURE_SOURCES + ("pku_saferlhf_30k",),
            dict(_MIXTURE2_OPTIONS),
            _MIXTURE2_COUNTS,
        ),
        Recipe(
            "mixture4",
            "RLHFlow version 4: mixture2 + 150K samples of PKU-SafeRLHF (safer response chosen)",
            _MIXTURE_SOURCES + ("pku_saferlhf",),
            {**_MIXTURE2_OPTIONS, "pku_max_pairs": 150000},
            _MIXTURE2_COUNTS,
        ),
    )
}


def resolve_options(recipe: str | None, overrides: dict[str, Any]) -> SelectionOptions:
    """Defaults < recipe < explicit overrides (keys whose value is None are 'not given')."""
    values: dict[str, Any] = {}
    if recipe is not None:
        if recipe not in RECIPES:
            raise UserError(f"--recipe must be one of {', '.join(RECIPES)}, not '{recipe}'")
        values.update(RECIPES[recipe].options)
    known = {f.name for f in fields(SelectionOptions)}
    for key, value in overrides.items():
        if key not in known:
            raise KeyError(key)  # a programming error, not a user one
        if value is not None:
            values[key] = tuple(value) if isinstance(value, list) else value
    return SelectionOptions(**values)


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


# ---------------------------------------------------------------------------------------------------------------
# small validated accessors (schema violations are user errors naming file, row and field)
# ---------------------------------------------------------------------------------------------------------------
def _field(row: dict, name: str, loc: tuple) -> Any:
    if not isinstance(row, dict):
        raise UserError(f"{where(*loc)}: expected a JSON object, found {type(row).__name__}")
    if name not in row:
        raise UserError(f"{where(*loc, name)}: missing (this source's rows need it; see its dataset card)")
    return row[name]


def _string(row: dict, name: str, loc: tuple) -> str:
    value = _field(row, name, loc)
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
    value = _field(row, name, loc)
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
    label = _field(row, "labels", loc)
    if label not in (0, 1) or isinstance(label, bool):
        raise UserError(f"{where(*loc, 'labels')}: expected 0 or 1, found {label!r}")
    ratio = _rating(row, "score_ratio", loc)
    if ratio is None:
        raise UserError(f"{where(*loc, 'score_ratio')}: expected a number, found {row['score_ratio']!r}")
    post_id = str(_field(row, "post_id", loc))
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
    completions = _field(row, "completions", loc)
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
    chosen_conv = _messages(_field(row, "chosen", loc), loc, "chosen")
    rejected_conv = _messages(_field(row, "rejected", loc), loc, "rejected")
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
    rating = _field(row, "rating", loc)
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
        value = _field(row, name, loc)
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
def _rng(seed: int, *parts: Any) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`, so the stream does not depend on PYTHONHASHSEED.
    return random.Random(":".join(str(part) for part in (seed, *parts)))


def _make_pair(ranked: RankedPrompt, better: ScoredResponse, worse: ScoredResponse, source: str) -> Pair:
    return Pair(ranked.prompt, _assistant(better.text), _assistant(worse.text), source,
                f"{source}:{ranked.key}:{better.tag}-{worse.tag}", subset=ranked.subset,
                chosen_score=better.score, rejected_score=worse.score, tie=better.score == worse.score)


def pairs_best_vs_random(ranked: RankedPrompt, source: str, seed: int, ties: str = "drop") -> list[Pair]:
    """One pair: the best-scored response vs one drawn from the rest. Unscored responses take no part."""
    scored = [response for response in ranked.responses if response.score is not None]
    if len(scored) < 2:
        return []
    best = max(scored, key=lambda response: response.score)  # max() keeps the first of equal maxima
    others = [response for response in scored if response is not best]
    if ties == "resample":
        strictly_worse = [response for response in others if response.score < best.score]
        others = strictly_worse or others  # all equal: the draw is a tie whatever happens
    other = _rng(seed, source, ranked.key).choice(others)
    return [_make_pair(ranked, best, other, source)]


def pairs_all(ranked: RankedPrompt, source: str) -> list[Pair]:
    """All C(n, 2) pairs of scored responses, the higher score as chosen (the earlier one on a tie)."""
    scored = [response for response in ranked.responses if response.score is not None]
    pairs = []
    for first, second in combinations(scored, 2):
        better, worse = (second, first) if second.score > first.score else (first, second)
        pairs.append(_make_pair(ranked, better, worse, source))
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# selection rules: pure functions list[Pair] → (kept, number dropped)
# ---------------------------------------------------------------------------------------------------------------
def _content(messages: list[dict]) -> list[tuple[str, str]]:
    return [(message["role"], message["content"].strip()) for message in messages]


def drop_identical(pairs: list[Pair]) -> tuple[list[Pair], int]:
    """Chosen == rejected (up to surrounding whitespace) teaches nothing and is label noise."""
    kept = [pair for pair in pairs if _content(pair.chosen) != _content(pair.rejected)]
    return kept, len(pairs) - len(kept)


def drop_empty(pairs: list[Pair]) -> tuple[list[Pair], int]:
    kept = [pair for pair in pairs
            if all(message["content"].strip() for message in pair.chosen + pair.rejected)]
    return kept, len(pairs) - len(kept)


def drop_ties(pairs: list[Pair], ties: str = "drop") -> tuple[list[Pair], int]:
    if ties == "keep":
        return list(pairs), 0
    kept = [pair for pair in pairs if not pair.tie]
    return kept, len(pairs) - len(kept)


def filter_score_ratio(pairs: list[Pair], min_ratio: float) -> tuple[list[Pair], int]:
    """Keep pairs with score_ratio strictly greater than `min_ratio` (SHP: "score ratio > 2")."""
    kept = [pair for pair in pairs if pair.score_ratio is not None and pair.score_ratio > min_ratio]
    return kept, len(pairs) - len(kept)


def cap_per_prompt(pairs: list[Pair], max_pairs: int | None, select: str = "random", seed: int = 0,
                   source: str = "") -> tuple[list[Pair], int]:
    """At most `max_pairs` pairs per `pair.group`, chosen by `select`; output keeps the input order."""
    if max_pairs is None:
        return list(pairs), 0
    groups: OrderedDict[str, list[int]] = OrderedDict()
    for position, pair in enumerate(pairs):
        groups.setdefault(pair.group if pair.group is not None else pair.id, []).append(position)
    keep: set[int] = set()
    for group, positions in groups.items():
        if len(positions) <= max_pairs:
            keep.update(positions)
            continue
        if select == "first":
            chosen = positions[:max_pairs]
        elif select == "max_ratio":
            chosen = sorted(positions, key=lambda p: -(pairs[p].score_ratio or 0.0))[:max_pairs]  # stable on ties
        else:
            chosen = _rng(seed, source, "cap", group).sample(positions, max_pairs)
        keep.update(chosen)
    kept = [pair for position, pair in enumerate(pairs) if position in keep]
    return kept, len(pairs) - len(kept)


def subsample(pairs: list[Pair], max_pairs: int | None, seed: int = 0, source: str = "") -> tuple[list[Pair], int]:
    """A seeded uniform sample of `max_pairs` pairs (all of them if there are fewer), in input order."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return list(pairs), 0
    keep = set(_rng(seed, source, "subsample").sample(range(len(pairs)), max_pairs))
    kept = [pair for position, pair in enumerate(pairs) if position in keep]
    return kept, len(pairs) - len(kept)


# ---------------------------------------------------------------------------------------------------------------
# the manifest entry of one source
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SourceReport:
    """Counts that add up: input_rows = rows_converted + Σ dropped_rows; candidate_pairs = kept + Σ dropped_pairs."""

    source: str
    origin: list[str] = field(default_factory=list)  # files or hub name read
    input_rows: int = 0
    dropped_rows: dict[str, int] = field(default_factory=dict)
    rows_converted: int = 0
    responses_without_score: int = 0
    candidate_pairs: int = 0
    dropped_pairs: dict[str, int] = field(default_factory=dict)
    kept: int = 0
    published_count: int | None = None
    revision: dict | None = None  # {"hub_name", "requested", "resolved", "note"} or {"local_copy": True, ...}
    shortfall: dict | None = None  # a requested sample size the source could not fill (see build_source)

    def drop_row(self, rule: str, count: int = 1) -> None:
        self.dropped_rows[rule] = self.dropped_rows.get(rule, 0) + count

    def apply(self, rule: str, result: tuple[list[Pair], int]) -> list[Pair]:
        kept, dropped = result
        self.dropped_pairs[rule] = self.dropped_pairs.get(rule, 0) + dropped
        return kept

    def check(self) -> None:
        if self.input_rows != self.rows_converted + sum(self.dropped_rows.values()):
            raise AssertionError(f"{self.source}: row counts do not add up: {self.to_dict()}")
        if self.candidate_pairs != self.kept + sum(self.dropped_pairs.values()):
            raise AssertionError(f"{self.source}: pair counts do not add up: {self.to_dict()}")

    def to_dict(self) -> dict:
        out = {
            "origin": self.origin,
            "input_rows": self.input_rows,
            "dropped_rows": dict(self.dropped_rows),
            "rows_converted": self.rows_converted,
            "candidate_pairs": self.candidate_pairs,
            "dropped_pairs": dict(self.dropped_pairs),
            "kept": self.kept,
        }
        if self.responses_without_score:
            out["responses_without_score"] = self.responses_without_score
        if self.published_count is not None:
            out["published_count"] = self.published_count
            out["holds_fewer_rows_than_published"] = self.input_rows < self.published_count
        if self.revision is not None:
            out["revision"] = dict(self.revision)
        if self.shortfall is not None:
            out["shortfall"] = dict(self.shortfall)
        return out


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


def _convert_rows(records: Iterable[Record], convert: Callable[[Record], Any], report: SourceReport) -> list:
    converted = []
    for record in records:
        report.input_rows += 1
        try:
            converted.append(convert(record))
        except Dropped as drop:
            report.drop_row(drop.rule)
    report.rows_converted = len(converted)
    return converted


def _progress(records: list[Record], key: str) -> Iterable[Record]:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return records
    return tqdm(records, desc=f"convert {key}", unit="row", disable=None, leave=False)


def build_source(key: str, records: list[Record], options: SelectionOptions, seed: int,
                 decontaminator: Decontaminator | None = None, allow_short: bool = False,
                 origin: Sequence[str] = ()) -> tuple[list[Pair], SourceReport]:
    """Convert one source's rows and apply its rules in order; returns kept pairs and the filled report.

    Rule order: identical responses, empty responses, ties, source rules (SHP ratio then per-prompt cap; PKU
    subsample), decontamination. Each rule counts what it removed from what the previous ones left.

    A sample size the source cannot fill (PKU `pku_max_pairs` larger than the pairs left, e.g. mixture4's 150K from
    a release with ~74K rows) is a UserError naming both numbers; with `allow_short` it is a loud warning and is
    recorded in the report's `shortfall` instead. `origin` (what was read) only serves that message.
    """
    spec = SOURCES[key]
    report = SourceReport(spec.label)
    rows = _progress(records, key)

    if key in ("ultrafeedback", "helpsteer"):
        if key == "ultrafeedback":
            ranked = _convert_rows(
                rows, lambda r: convert_ultrafeedback(r.data, (r.path, r.row), options.ultrafeedback_score, r.key), report)
            pairing = options.ultrafeedback_pairing
        else:
            ranked = _group_helpsteer(rows, options, report)
            pairing = options.helpsteer_pairing
        candidates = []
        for prompt in ranked:
            scored = sum(response.score is not None for response in prompt.responses)
            report.responses_without_score += len(prompt.responses) - scored
            if scored < 2:
                # No pair: its rows (one UltraFeedback row, or all HelpSteer rows of the prompt) are a row-level drop.
                rows_of_prompt = len(prompt.responses) if key == "helpsteer" else 1
                report.drop_row("fewer_than_two_scored_responses", rows_of_prompt)
                report.rows_converted -= rows_of_prompt
                continue
            if pairing == "all_pairs":
                candidates += pairs_all(prompt, spec.label)
            else:
                candidates += pairs_best_vs_random(prompt, spec.label, seed, options.ties)
    else:
        convert = _pair_converter(key, options)
        candidates = _convert_rows(rows, convert, report)

    report.candidate_pairs = len(candidates)
    pairs = report.apply("identical_responses", drop_identical(candidates))
    pairs = report.apply("empty_response", drop_empty(pairs))
    pairs = report.apply("ties", drop_ties(pairs, options.ties))
    if key == "shp":
        pairs = report.apply(f"score_ratio<={options.shp_min_score_ratio:g}",
                             filter_score_ratio(pairs, options.shp_min_score_ratio))
        pairs = report.apply("per_prompt_cap", cap_per_prompt(pairs, options.shp_max_pairs_per_prompt,
                                                              options.shp_select, seed, spec.label))
    if key in ("pku_saferlhf", "pku_saferlhf_30k"):
        if options.pku_max_pairs is not None and len(pairs) < options.pku_max_pairs:
            report.shortfall = {"rule": "pku_max_pairs", "requested": options.pku_max_pairs,
                                "available": len(pairs), "input_rows": report.input_rows}
            where_from = ", ".join(origin) or spec.label
            message = (f"{spec.label}: the recipe asks for {options.pku_max_pairs} pairs (--pku_max_pairs) but "
                       f"{where_from} holds only {len(pairs)} after the rules ({report.input_rows} rows read)")
            if not allow_short:
                hint = (f"; that count exists only in revision '{spec.revision}' of {spec.hub_name} "
                        f"({spec.revision_note.split(';')[0]})" if spec.revision and spec.revision != "main" else "")
                raise UserError(f"{message}{hint}; load the release the recipe was built from, lower "
                                "--pku_max_pairs, or pass --allow_short_sources true to build with what there is")
            logger.warning("!!! %s: building with %d pairs instead of %d (--allow_short_sources true) !!!",
                           message, len(pairs), options.pku_max_pairs)
        pairs = report.apply("subsample", subsample(pairs, options.pku_max_pairs, seed, spec.label))
    if decontaminator is not None:
        pairs = report.apply("decontaminated", decontaminate(pairs, decontaminator))
    report.kept = len(pairs)
    return pairs, report


def _pair_converter(key: str, options: SelectionOptions) -> Callable[[Record], Pair]:
    if key == "hh_rlhf":
        return lambda r: convert_hh_rlhf(r.data, (r.path, r.row), r.subset, r.key)
    if key == "shp":
        return lambda r: convert_shp(r.data, (r.path, r.row), r.key)
    if key == "capybara":
        return lambda r: convert_capybara(r.data, (r.path, r.row), r.key)
    if key == "orca":
        return lambda r: convert_orca(r.data, (r.path, r.row), r.key)
    if key in ("pku_saferlhf", "pku_saferlhf_30k"):
        label = SOURCES[key].label
        return lambda r: convert_pku(r.data, (r.path, r.row), options.pku_preference, label, r.key)
    if key == "lmflow":
        from .lmflow import instance_to_pair

        return lambda r: _lmflow_pair(instance_to_pair(r.data, (r.path, r.row)), r)
    raise KeyError(key)


def _lmflow_pair(row: dict, record: Record) -> Pair:
    return Pair(row["prompt"], row["chosen"], row["rejected"], "lmflow", f"lmflow:{record.key}")


def _group_helpsteer(records: Iterable[Record], options: SelectionOptions, report: SourceReport) -> list[RankedPrompt]:
    """HelpSteer has one row per response; the responses to the same prompt text form one ranked prompt."""
    groups: OrderedDict[str, RankedPrompt] = OrderedDict()
    for record in records:
        report.input_rows += 1
        prompt, response = convert_helpsteer(record.data, (record.path, record.row), options.helpsteer_attributes,
                                             record.key)
        if prompt not in groups:
            groups[prompt] = RankedPrompt(user_prompt(prompt), [], key=record.key)
        groups[prompt].responses.append(response)
    report.rows_converted = report.input_rows
    return list(groups.values())


# ---------------------------------------------------------------------------------------------------------------
# reading sources: local copies (same column names as the hub) or the hub itself
# ---------------------------------------------------------------------------------------------------------------
_DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


def _read_file(path: Path) -> list[dict]:
    return read_records(str(path))


def _data_files(path: Path, split: str) -> list[Path]:
    """A file itself; in a directory, files named '<split>*' (the hub layouts), else every data file; sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: not found")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_DATA_SUFFIXES)
                   and not p.name.startswith("."))
    by_split = [p for p in files if p.name.startswith(split)]
    chosen = by_split or files
    if not chosen:
        raise UserError(f"{path}: no data files ({', '.join(_DATA_SUFFIXES)}) in this directory")
    return chosen


def find_local_copy(source_dir: str | None, key: str) -> str | None:
    """`<source_dir>/<key>` as a directory or as `<key>.jsonl|.jsonl.gz|.json|.parquet`."""
    if not source_dir:
        return None
    base = Path(source_dir)
    if (base / key).is_dir():
        return str(base / key)
    for suffix in _DATA_SUFFIXES:
        if (base / f"{key}{suffix}").is_file():
            return str(base / f"{key}{suffix}")
    return None


def read_local(key: str, paths: Sequence[str], split: str, options: SelectionOptions) -> tuple[list[Record], list[str]]:
    """Rows of a local copy. HH-RLHF directories laid out like the hub (`helpful-base/train.jsonl.gz`) are
    filtered to `options.hh_rlhf_subsets`; the subset name becomes the row's `subset`."""
    records: list[Record] = []
    origin: list[str] = []
    per_file: list[tuple[str, str | None, list[dict]]] = []
    for raw in paths:
        path = Path(raw)
        files = _data_files(path, split)
        for file in files:
            subset = None
            if key == "hh_rlhf" and path.is_dir():
                subset = file.relative_to(path).parts[0] if len(file.relative_to(path).parts) > 1 else None
                if subset is not None and subset not in options.hh_rlhf_subsets:
                    continue
            if key == "lmflow":
                from .lmflow import read_lmflow_instances

                rows = read_lmflow_instances(file, expect="paired")
            else:
                rows = _read_file(file)
            origin.append(str(file))
            per_file.append((str(file), subset, rows))
    if not origin:
        wanted = f" in subsets {', '.join(options.hh_rlhf_subsets)}" if key == "hh_rlhf" else ""
        raise UserError(f"{', '.join(paths)}: no {key} data files for split '{split}'{wanted}")
    files_per_subset = Counter(subset for _, subset, _ in per_file)
    seen: Counter = Counter()
    for file, subset, rows in per_file:
        seen[subset] += 1
        # Row numbers repeat across files: number the files when a subset has several, so keys stay unique.
        file_number = seen[subset] if files_per_subset[subset] > 1 else None
        records += [Record(file, number, row, subset, file_number) for number, row in enumerate(rows, start=1)]
    return records, origin


def resolve_hub_revision(hub_name: str, revision: str | None) -> str | None:
    """The commit a hub revision (branch or tag) points to now, or None offline / on any failure."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(hub_name, revision=revision, timeout=10).sha
    except Exception:  # noqa: BLE001 - offline, no access, old client: the requested revision is still recorded
        return None


def revision_record(key: str, revision: str | None = None, resolved: str | None = None) -> dict:
    """What manifest.json says about a hub source's revision."""
    spec = SOURCES[key]
    requested = revision if revision is not None else spec.revision
    return {"hub_name": spec.hub_name, "requested": requested, "resolved": resolved,
            "pinned": spec.revision, "note": spec.revision_note if requested == spec.revision else "set by --hub_revision"}


def parse_hub_revisions(values: Sequence[str] | None) -> dict[str, str]:
    """`--hub_revision key=rev ...` → {key: rev}, refusing unknown sources and sources without a hub copy."""
    out: dict[str, str] = {}
    for value in values or []:
        key, sep, revision = value.partition("=")
        if not sep or not revision:
            raise UserError(f"--hub_revision: '{value}' must be SOURCE=REVISION, e.g. pku_saferlhf=v0")
        if key not in SOURCES or SOURCES[key].hub_name is None:
            raise UserError(f"--hub_revision: '{key}' is not a hub source "
                            f"({', '.join(k for k, s in SOURCES.items() if s.hub_name)})")
        out[key] = revision
    return out


def load_hub(key: str, split: str, options: SelectionOptions,
             revision: str | None = None) -> tuple[list[Record], list[str]]:
    """Rows from the Hugging Face hub via `datasets.load_dataset` at the source's pinned revision (or `revision`);
    offline this is a one-line UserError."""
    spec = SOURCES[key]
    if spec.hub_name is None:
        raise UserError(f"--{key}_path is required: this source has no hub copy")
    revision = revision if revision is not None else spec.revision
    data_dirs = list(options.hh_rlhf_subsets) if key == "hh_rlhf" else [None]
    records: list[Record] = []
    origin: list[str] = []
    for data_dir in data_dirs:
        label = (f"{spec.hub_name}" + (f"@{revision}" if revision else "") + (f"/{data_dir}" if data_dir else "")
                 + f"[{split}]")
        try:
            import datasets

            dataset = datasets.load_dataset(spec.hub_name, data_dir=data_dir, split=split, revision=revision)
            rows = dataset.to_list()
        except Exception as exc:  # network, auth, missing split: all mean "use a local copy"
            reason = " ".join(str(exc).split())[:160]
            raise UserError(
                f"could not load '{spec.hub_name}' from the Hugging Face hub ({type(exc).__name__}: {reason}); "
                f"pass a local copy with the same column names via --{key}_path or --source_dir"
            ) from None
        origin.append(label)
        records += [Record(label, number, row, data_dir) for number, row in enumerate(rows, start=1)]
    return records, origin


# ---------------------------------------------------------------------------------------------------------------
# decontamination against an evaluation set
# ---------------------------------------------------------------------------------------------------------------
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation and spacing differences must not hide an overlap."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(tokens[start:start + n]) for start in range(len(tokens) - n + 1))


def prompt_texts(prompt: Any) -> list[str]:
    """The texts of an evaluation prompt: a string (RewardBench) or a list of messages (canonical)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
        return [message["content"] for message in prompt]
    raise ValueError("expected a string or a list of {role, content} messages")


class Decontaminator:
    """Flags a training prompt that shares an n-gram of `n` words with any evaluation prompt.

    N-grams never span two messages. Evaluation prompts shorter than `n` words cannot be matched and are counted
    in `eval_prompts_too_short` so the report says so instead of pretending they were checked.
    """

    def __init__(self, eval_prompts: Iterable[list[str]], n: int = 13):
        if n < 1:
            raise UserError(f"--decontamination_ngram must be >= 1, not {n}")
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.eval_prompts = 0
        self.eval_prompts_too_short = 0
        for texts in eval_prompts:
            self.eval_prompts += 1
            found = False
            for text in texts:
                grams = set(ngrams(words(text), n))
                found = found or bool(grams)
                self.grams |= grams
            if not found:
                self.eval_prompts_too_short += 1
        self._first_words = {gram[0] for gram in self.grams}
        self._memo: dict[tuple, bool] = {}  # all-pairs recipes repeat each prompt up to six times

    def contaminated(self, prompt: list[dict]) -> bool:
        key = tuple((message["role"], message["content"]) for message in prompt)  # str hashes are cached
        if key not in self._memo:
            self._memo[key] = any(self._text_hits(message["content"]) for message in prompt)
        return self._memo[key]

    def _text_hits(self, text: str) -> bool:
        tokens = words(text)
        n = self.n
        return any(tokens[start] in self._first_words and tuple(tokens[start:start + n]) in self.grams
                   for start in range(len(tokens) - n + 1))


def decontaminate(pairs: list[Pair], decontaminator: Decontaminator) -> tuple[list[Pair], int]:
    kept = [pair for pair in pairs if not decontaminator.contaminated(pair.prompt)]
    return kept, len(pairs) - len(kept)


def load_eval_prompts(path: str) -> list[list[str]]:
    """Prompts of an evaluation file (RewardBench rows, canonical pairs or prompt rows): its `prompt` field."""
    file = Path(path)
    if not file.exists():
        raise UserError(f"{path}: --decontaminate_against file not found")
    rows = []
    for data_file in _data_files(file, "") if file.is_dir() else [file]:
        rows += [(str(data_file), number, row) for number, row in enumerate(_read_file(data_file), start=1)]
    prompts = []
    for file_name, number, row in rows:
        prompt = _field(row, "prompt", (file_name, number))
        try:
            prompts.append(prompt_texts(prompt))
        except ValueError as exc:
            raise UserError(f"{where(file_name, number, 'prompt')}: {exc}") from None
    return prompts
