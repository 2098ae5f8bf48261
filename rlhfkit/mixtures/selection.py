"""Selection rules over lists of `Pair`s, and `build_source`: one source's rows → converter → rules, every drop
counted in its `SourceReport` (the manifest entry of that source).

Each rule is a pure function `list[Pair] → (kept, number dropped)`, so each can be tested on a hand-made list.
Converters and pairing: `rlhfkit.mixtures.sources`; which rules a mixture turns on: `rlhfkit.mixtures.catalog.SelectionOptions`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.mixtures.decontamination import Decontaminator, decontaminate
from rlhfkit.errors import UserError
from rlhfkit.mixtures.catalog import SOURCES, SelectionOptions
from rlhfkit.mixtures.sources import (
    Dropped,
    Pair,
    RankedPrompt,
    Record,
    convert_capybara,
    convert_helpsteer,
    convert_hh_rlhf,
    convert_orca,
    convert_pku,
    convert_shp,
    convert_ultrafeedback,
    pairs_all,
    pairs_best_vs_random,
    seeded_rng,
    user_prompt,
)

logger = logging.getLogger(__name__)


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
            chosen = seeded_rng(seed, source, "cap", group).sample(positions, max_pairs)
        keep.update(chosen)
    kept = [pair for position, pair in enumerate(pairs) if position in keep]
    return kept, len(pairs) - len(kept)


def subsample(pairs: list[Pair], max_pairs: int | None, seed: int = 0, source: str = "") -> tuple[list[Pair], int]:
    """A seeded uniform sample of `max_pairs` pairs (all of them if there are fewer), in input order."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return list(pairs), 0
    keep = set(seeded_rng(seed, source, "subsample").sample(range(len(pairs)), max_pairs))
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
            message = (f"{spec.label}: the mixture asks for {options.pku_max_pairs} pairs (--pku_max_pairs) but "
                       f"{where_from} holds only {len(pairs)} after the rules ({report.input_rows} rows read)")
            if not allow_short:
                hint = (f"; that count exists only in revision '{spec.revision}' of {spec.hub_name} "
                        f"({spec.revision_note.split(';')[0]})" if spec.revision and spec.revision != "main" else "")
                raise UserError(f"{message}{hint}; load the release the mixture was built from, lower "
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
        from rlhfkit.mixtures.lmflow import instance_to_pair

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
