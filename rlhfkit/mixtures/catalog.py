"""The RLHFlow reward-model training mixtures: the public sources they draw on (pinned hub revisions), the selection
options, and the four published mixtures with their published per-source counts.

"Mixture" is the name for these data mixtures throughout the code; the stage YAMLs in `configs/recipes/` are
something else. `prepare_data.py --recipe mixtureN` keeps its flag name for compatibility and means a mixture.

The rest of the build lives beside this module, one topic each:
  rlhfkit/sources.py          per-source row converters (dataset-card schema → `Pair`) and pairing of ranked prompts
  rlhfkit/selection.py        selection rules over lists of pairs, and `build_source` (converter → rules, counted)
  rlhfkit/source_loading.py   reading a source: a local copy, or the hub at its pinned revision
  rlhfkit/decontamination.py  n-gram decontamination against an evaluation set

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
  lmflow             a local LMFlow {"instances": [{"positive", "negative"}]} file (see rlhfkit.mixtures.lmflow)

Revisions: every hub source is loaded at a pinned revision (`PublicSource.revision`, overridable with
`prepare_data.py --hub_revision key=rev`), and manifest.json records the revision asked for and the commit it
resolved to. PKU-SafeRLHF is pinned to 'v0', its first release (the one mixture4's "150K samples" come from; the
current 'main' holds about half that); the others to 'main', because neither their dataset cards nor RLHFlow's
README identify the revision the mixtures were built from. A mixture that asks a source for more pairs than it holds
(`pku_max_pairs`) stops with both numbers, or warns loudly under `--allow_short_sources true`.

Assumptions (where the published description leaves a choice):
  - A row that breaks its schema (missing column, wrong type) is a user error; a well-formed row whose content is
    unusable (dialogue that does not alternate, chosen/rejected prompts that differ, no rating) is dropped and
    counted under a named rule, because the public datasets contain a few such rows.
  - HH-RLHF "all of base, rejection-sampled and online" means the three helpful-* subsets (their train splits sum
    hold 118,263 rows; the published 115,547 is what remains after removing chosen == rejected).
  - "Best vs a random other" (`sources.pairs_best_vs_random`, on `pairs.best_vs_random_other`, the rule annotate's
    `max_random` uses too): the best is the first completion with the top score; the other is drawn uniformly from
    the remaining ones with a generator seeded by (seed, source, row), so the draw of one prompt does not depend on
    any other prompt. A draw that ties with the best is dropped (`ties=drop`, the published rule), kept
    (`ties=keep`) or redrawn among strictly worse completions (`ties=resample`).
  - Per-prompt caps (SHP) keep a seeded random subset of each post's comparisons by default (`shp_select`).
  - Orca and Capybara already orient chosen/rejected by rating; a tie is equal ratings (or Orca's status "tie").
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from rlhfkit.errors import UserError


# ---------------------------------------------------------------------------------------------------------------
# public sources (pinned revisions), selection options, the mixtures
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublicSource:
    key: str  # flag prefix: --<key>_path
    label: str  # value of the `source` field in the output
    hub_name: str | None
    revision: str | None = None  # the hub revision loaded (branch, tag or commit); see `revision_note`
    revision_note: str = ""  # why this revision


_CURRENT = ("not identifiable from the dataset card (no release tags; RLHFlow's README names no revision): the "
            "current branch 'main' is named, and the commit it resolves to is recorded in manifest.json")
SOURCES: dict[str, PublicSource] = {
    spec.key: spec
    for spec in (
        PublicSource("hh_rlhf", "hh-rlhf", "Anthropic/hh-rlhf", "main", _CURRENT),
        PublicSource("shp", "shp", "stanfordnlp/SHP", "main", _CURRENT),
        PublicSource("ultrafeedback", "ultrafeedback", "openbmb/UltraFeedback", "main", _CURRENT),
        PublicSource("helpsteer", "helpsteer", "nvidia/HelpSteer", "main", _CURRENT),
        PublicSource("capybara", "capybara", "argilla/distilabel-capybara-dpo-7k-binarized", "main", _CURRENT),
        PublicSource("orca", "orca", "argilla/distilabel-intel-orca-dpo-pairs", "main", _CURRENT),
        PublicSource("pku_saferlhf_30k", "pku-saferlhf-30k", "PKU-Alignment/PKU-SafeRLHF-30K", "main", _CURRENT),
        PublicSource("pku_saferlhf", "pku-saferlhf", "PKU-Alignment/PKU-SafeRLHF", "v0",
                   "the first release (~297K train rows), kept on the hub as revision 'v0' (the current dataset card "
                   "calls it PKU-SafeRLHF-v0 and links tree/v0); RLHFlow's mixture4 (early 2024) takes 150K pairs, "
                   "which only this release holds: the June 2024 re-release on 'main' has ~74K train rows"),
        PublicSource("lmflow", "lmflow", None),
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
    """Every selection knob. The defaults are the rules shared by all four mixtures; mixtures override a few."""

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
class Mixture:
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

MIXTURES: dict[str, Mixture] = {
    mixture.name: mixture
    for mixture in (
        Mixture(
            "mixture1",
            "RLHFlow version 1 (~250K pairs): HH-RLHF helpful subsets without chosen == rejected; SHP score ratio > 2, "
            "one comparison per post; UltraFeedback and HelpSteer best vs a random other, ties dropped; Capybara "
            "and Orca without tied ratings",
            _MIXTURE_SOURCES,
            {"shp_max_pairs_per_prompt": 1, "ultrafeedback_pairing": "best_vs_random",
             "helpsteer_pairing": "best_vs_random"},
            _MIXTURE1_COUNTS,
        ),
        Mixture(
            "mixture2",
            "RLHFlow version 2: as mixture1 but SHP at most 5 comparisons per post, UltraFeedback and HelpSteer all "
            "6 pairs per prompt, ties dropped",
            _MIXTURE_SOURCES,
            dict(_MIXTURE2_OPTIONS),
            _MIXTURE2_COUNTS,
        ),
        Mixture(
            "mixture3",
            "RLHFlow version 3: mixture2 + the train split of PKU-SafeRLHF-30K (safer response chosen)",
            _MIXTURE_SOURCES + ("pku_saferlhf_30k",),
            dict(_MIXTURE2_OPTIONS),
            _MIXTURE2_COUNTS,
        ),
        Mixture(
            "mixture4",
            "RLHFlow version 4: mixture2 + 150K samples of PKU-SafeRLHF (safer response chosen)",
            _MIXTURE_SOURCES + ("pku_saferlhf",),
            {**_MIXTURE2_OPTIONS, "pku_max_pairs": 150000},
            _MIXTURE2_COUNTS,
        ),
    )
}


def resolve_options(mixture: str | None, overrides: dict[str, Any]) -> SelectionOptions:
    """Defaults < mixture < explicit overrides (keys whose value is None are 'not given').

    `mixture` is what `prepare_data.py --recipe` names (the flag keeps its old name)."""
    values: dict[str, Any] = {}
    if mixture is not None:
        if mixture not in MIXTURES:
            raise UserError(f"--recipe must be one of {', '.join(MIXTURES)}, not '{mixture}'")
        values.update(MIXTURES[mixture].options)
    known = {f.name for f in fields(SelectionOptions)}
    for key, value in overrides.items():
        if key not in known:
            raise KeyError(key)  # a programming error, not a user one
        if value is not None:
            values[key] = tuple(value) if isinstance(value, list) else value
    return SelectionOptions(**values)
