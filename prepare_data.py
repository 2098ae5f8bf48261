"""Build a reward-model preference dataset from public sources: the named RLHFlow mixtures or any set of sources.

    python prepare_data.py --mixture mixture1 --source_dir data/raw --output_dir data/mixture1
    python prepare_data.py --mixture mixture2 --decontaminate_against data/rewardbench.jsonl --output_dir data/m2
    python prepare_data.py --shp_path shp/ --shp_max_pairs_per_prompt 3 --output_dir data/shp3

Features
  - one pure converter per source (rlhfkit/mixtures/sources.py), from the columns on its dataset card to canonical pairs
    {"prompt", "chosen", "rejected", "source", "subset", "id"} (docs/internals.md);
  - the selection rules as flags: SHP score-ratio threshold and per-post cap, best-vs-random or all pairs for
    UltraFeedback/HelpSteer, tie handling, PKU safer/better/agree, PKU subsample size;
  - `--mixture mixture1..mixture4`: the four published data mixtures (rlhfkit/mixtures/catalog.py; `--recipe` is
    its deprecated old name); explicit flags override a mixture's values;
  - `--decontaminate_against FILE`: drops pairs whose prompt shares an n-gram of `--decontamination_ngram`
    words with an evaluation prompt (RewardBench rows or our schema);
  - `--export_lmflow true`: also writes the pairs as LMFlow {"instances": [{"positive", "negative"}]}.

Assumptions
  - Each source is read from `--<source>_path` (file or directory with the hub's column names), else from
    `--source_dir/<source>` (directory, .jsonl, .jsonl.gz, .json or .parquet), else from the hub with
    `datasets.load_dataset` at the source's pinned revision (PKU-SafeRLHF: 'v0', the release mixture4 was built
    from; others 'main'; `--hub_revision` overrides); offline the last one fails with a one-line error asking for a
    local copy.
  - Output is deterministic given `--seed`: same inputs and flags give byte-identical pairs.jsonl and manifest.json.

Writes OUTPUT_DIR/ (renamed into place from OUTPUT_DIR.partial/ when complete):
  pairs.jsonl      the dataset, sources in mixture order, rows in source order
  manifest.json    per source: input rows, rows dropped by each rule, candidate pairs, pairs dropped by each rule,
                   kept, and the published count to compare with; the hub revision asked for and the commit it
                   resolved to (`revisions`); any requested count the source could not fill (`shortfalls`, only
                   with --allow_short_sources true: otherwise that is an error); the final count; decontamination
  pairs.lmflow.json (with --export_lmflow), metrics.json, args.yaml, run_info.json
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

from rlhfkit.builtin_models import sha256_file
from rlhfkit.checkpoints import StageOutput
from rlhfkit.files import write_json_atomic
from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.files import write_jsonl_atomic
from rlhfkit.errors import UserError
from rlhfkit.mixtures.decontamination import Decontaminator, load_eval_prompts
from rlhfkit.mixtures.catalog import MIXTURES, SOURCES, SelectionOptions, resolve_options
from rlhfkit.mixtures.selection import build_source
from rlhfkit.mixtures.loading import (
    find_local_copy,
    load_hub,
    parse_hub_revisions,
    read_local,
    resolve_hub_revision,
    revision_record,
)

logger = logging.getLogger("prepare_data")

PAIRS_FILE = "pairs.jsonl"
MANIFEST_FILE = "manifest.json"
LMFLOW_FILE = "pairs.lmflow.json"


def _path_field(key: str):
    hub = SOURCES[key].hub_name
    where_from = f"hub copy: {hub}" if hub else "no hub copy"
    return field(default=None, metadata={"help": f"Local copy of {key} (files or dirs, same columns as the {where_from})."})


@dataclass
class ScriptArguments:
    output_dir: str = field(default=None, metadata={"help": "Directory to write pairs.jsonl and manifest.json into."})
    mixture: str | None = field(
        default=None, metadata={"help": f"Named data mixture (rlhfkit/mixtures/catalog.py; old name --recipe): "
                                        f"{', '.join(MIXTURES)}."})
    sources: list[str] | None = field(
        default=None, metadata={"help": f"Sources to build (default: the mixture's, else those given a path). "
                                        f"Names: {', '.join(SOURCES)}."})
    source_dir: str | None = field(
        default=None, metadata={"help": "Directory holding local copies named by source: <dir>/shp/, <dir>/shp.jsonl, ..."})
    split: str = field(default="train", metadata={"help": "Split to read (hub split; local files named <split>*)."})
    hh_rlhf_path: list[str] | None = _path_field("hh_rlhf")
    shp_path: list[str] | None = _path_field("shp")
    ultrafeedback_path: list[str] | None = _path_field("ultrafeedback")
    helpsteer_path: list[str] | None = _path_field("helpsteer")
    capybara_path: list[str] | None = _path_field("capybara")
    orca_path: list[str] | None = _path_field("orca")
    pku_saferlhf_30k_path: list[str] | None = _path_field("pku_saferlhf_30k")
    pku_saferlhf_path: list[str] | None = _path_field("pku_saferlhf")
    lmflow_path: list[str] | None = _path_field("lmflow")
    # selection rules: None means "the mixture's value, else the default in rlhfkit.mixtures.catalog.SelectionOptions"
    hh_rlhf_subsets: list[str] | None = field(
        default=None, metadata={"help": "HH-RLHF subsets (default: helpful-base helpful-online helpful-rejection-sampled)."})
    shp_min_score_ratio: float | None = field(
        default=None, metadata={"help": "SHP: keep comparisons with score_ratio strictly above this (default 2)."})
    shp_max_pairs_per_prompt: int | None = field(
        default=None, metadata={"help": "SHP: at most this many comparisons per post (mixture1: 1, mixture2-4: 5)."})
    shp_select: str | None = field(
        default=None, metadata={"help": "SHP cap picks: random (seeded, default) | max_ratio | first."})
    ultrafeedback_score: str | None = field(
        default=None, metadata={"help": "UltraFeedback ranking: fine_grained (mean of 4 aspect ratings, default) | overall."})
    ultrafeedback_pairing: str | None = field(
        default=None, metadata={"help": "best_vs_random (mixture1) | all_pairs (mixture2-4)."})
    helpsteer_attributes: list[str] | None = field(
        default=None, metadata={"help": "HelpSteer ranking: mean of these attributes (default helpfulness correctness)."})
    helpsteer_pairing: str | None = field(
        default=None, metadata={"help": "best_vs_random (mixture1) | all_pairs (mixture2-4)."})
    ties: str | None = field(
        default=None, metadata={"help": "Equal-score pairs: drop (default) | keep | resample (best_vs_random redraws "
                                        "among strictly worse responses)."})
    pku_preference: str | None = field(
        default=None, metadata={"help": "PKU-SafeRLHF chosen response: safer (default) | better | agree (only rows "
                                        "where both labels pick it)."})
    pku_max_pairs: int | None = field(
        default=None, metadata={"help": "PKU-SafeRLHF: seeded sample of at most this many pairs (mixture4: 150000)."})
    seed: int = field(default=42, metadata={"help": "Seed of every random choice (draws, caps, subsamples)."})
    decontaminate_against: list[str] | None = field(
        default=None, metadata={"help": "Evaluation files (rows with a 'prompt' field, e.g. RewardBench) to "
                                        "decontaminate against."})
    decontamination_ngram: int = field(
        default=13, metadata={"help": "Words in a shared n-gram that marks a training prompt as contaminated."})
    hub_revision: list[str] | None = field(
        default=None, metadata={"help": "Override a hub source's pinned revision: SOURCE=REVISION (branch, tag or "
                                        "commit), e.g. pku_saferlhf=main. Pins: rlhfkit/mixtures.py SOURCES."})
    allow_short_sources: bool = field(
        default=False, metadata={"help": "Build even when a source holds fewer pairs than the mixture asks for "
                                         "(--pku_max_pairs), with a loud warning and the numbers in manifest.json."})
    export_lmflow: bool = field(default=False, metadata={"help": "Also write pairs.lmflow.json (LMFlow paired format)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a complete --output_dir."})

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("--output_dir is required")
        if self.mixture is not None and self.mixture not in MIXTURES:
            raise ValueError(f"--mixture must be one of {', '.join(MIXTURES)}, not '{self.mixture}'")
        for name in self.sources or []:
            if name not in SOURCES:
                raise ValueError(f"--sources: unknown source '{name}' (known: {', '.join(SOURCES)})")
        if self.decontamination_ngram < 1:
            raise ValueError("--decontamination_ngram must be >= 1")

    def selection_overrides(self) -> dict:
        names = {f.name for f in dataclasses.fields(SelectionOptions)}
        return {name: getattr(self, name) for name in names}


def _sources_to_build(args: ScriptArguments) -> list[str]:
    if args.sources:
        return list(dict.fromkeys(args.sources))
    if args.mixture:
        return list(MIXTURES[args.mixture].sources)
    given = [key for key in SOURCES if getattr(args, f"{key}_path")]
    if not given:
        raise UserError("nothing to build: pass --mixture, --sources, or at least one --<source>_path")
    return given


def _read_source(key: str, args: ScriptArguments, options: SelectionOptions, revisions: dict[str, str]):
    """Rows, what was read, and the revision record for manifest.json."""
    paths = getattr(args, f"{key}_path")
    if not paths:
        local = find_local_copy(args.source_dir, key)
        paths = [local] if local else None
    if paths:
        records, origin = read_local(key, paths, args.split, options)
        pinned = SOURCES[key].revision if SOURCES[key].hub_name else None
        return records, origin, {"local_copy": True, "pinned_hub_revision": pinned,
                                 "note": "a local copy: its revision is whatever it was downloaded from"}
    revision = revisions.get(key)
    records, origin = load_hub(key, args.split, options, revision)
    spec = SOURCES[key]
    resolved = resolve_hub_revision(spec.hub_name, revision if revision is not None else spec.revision)
    return records, origin, revision_record(key, revision, resolved)


ARGUMENTS = (ScriptArguments,)  # what main takes (CLI, YAML, tests)


def main(script_args: ScriptArguments) -> dict:
    """Build the dataset; returns the manifest (also written to OUTPUT_DIR/manifest.json)."""
    # ---------------------------------------------------------------- setup
    setup_logging()
    options = resolve_options(script_args.mixture, script_args.selection_overrides())
    revisions = parse_hub_revisions(script_args.hub_revision)
    keys = _sources_to_build(script_args)
    mixture = MIXTURES.get(script_args.mixture) if script_args.mixture else None
    decontaminator = None
    if script_args.decontaminate_against:
        eval_prompts = []
        for path in script_args.decontaminate_against:
            eval_prompts += load_eval_prompts(path)
        decontaminator = Decontaminator(eval_prompts, script_args.decontamination_ngram)
    if os.path.exists(script_args.output_dir) and not script_args.overwrite_output_dir:
        # Fail before reading hundreds of thousands of rows, not after (StageOutput would refuse it at save).
        raise UserError(f"{script_args.output_dir}: output dir already exists; pass --overwrite_output_dir true "
                        f"or choose another --output_dir")

    # ---------------------------------------------------------------- data
    all_rows: list[dict] = []
    reports = {}
    for key in keys:
        records, origin, revision = _read_source(key, script_args, options, revisions)
        pairs, report = build_source(key, records, options, script_args.seed, decontaminator,
                                     allow_short=script_args.allow_short_sources, origin=origin)
        report.origin = origin
        report.revision = revision
        if mixture is not None and key in mixture.published_counts:
            report.published_count = mixture.published_counts[key]
            if report.input_rows < report.published_count:
                logger.warning("%s: %d rows read, fewer than the %d pairs the published %s took from this source",
                               key, report.input_rows, report.published_count, mixture.name)
        report.check()
        reports[SOURCES[key].label] = report.to_dict()
        all_rows += [pair.to_row() for pair in pairs]
        del records, pairs  # the raw rows of a large source are not needed any more
        logger.info("%s: %d rows read, %d pairs kept (dropped: rows %s, pairs %s)", key, report.input_rows,
                    report.kept, report.dropped_rows or "{}", {k: v for k, v in report.dropped_pairs.items() if v})

    manifest = {
        "recipe": script_args.mixture,
        "recipe_description": mixture.description if mixture else None,  # key names kept: manifests stay comparable
        "seed": script_args.seed,
        "split": script_args.split,
        "options": dataclasses.asdict(options),
        "sources": reports,
        "decontamination": None,
        "revisions": {label: entry.get("revision") for label, entry in reports.items()},
        "shortfalls": {label: entry["shortfall"] for label, entry in reports.items() if "shortfall" in entry},
        "final_count": len(all_rows),
        "counting": "per source: input_rows = rows_converted + sum(dropped_rows); candidate_pairs = kept + "
                    "sum(dropped_pairs); final_count = sum(kept). published_count is the RLHFlow README's figure "
                    "for the full public dataset.",
        "files": {"pairs": PAIRS_FILE},
    }
    if decontaminator is not None:
        dropped = {label: entry["dropped_pairs"].get("decontaminated", 0) for label, entry in reports.items()}
        manifest["decontamination"] = {
            "against": list(script_args.decontaminate_against),
            "ngram": decontaminator.n,
            "eval_prompts": decontaminator.eval_prompts,
            "eval_prompts_too_short": decontaminator.eval_prompts_too_short,
            "eval_ngrams": len(decontaminator.grams),
            "dropped_per_source": dropped,
            "dropped_total": sum(dropped.values()),
        }
        logger.info("decontamination: dropped %d pairs sharing a %d-gram with %d evaluation prompts",
                    sum(dropped.values()), decontaminator.n, decontaminator.eval_prompts)
    if not all_rows:
        raise UserError("no pairs left after the selection rules; see the counts above")

    # ---------------------------------------------------------------- save
    output = StageOutput(script_args.output_dir, stage="prepare_data", overwrite=script_args.overwrite_output_dir)
    staging = output.staging
    write_jsonl_atomic(staging / PAIRS_FILE, all_rows)
    if script_args.export_lmflow:
        from rlhfkit.mixtures.lmflow import export_pairs

        export_pairs(all_rows, staging / LMFLOW_FILE)
        manifest["files"]["lmflow"] = LMFLOW_FILE
    write_json_atomic(staging / MANIFEST_FILE, manifest)
    metrics = {"final_count": len(all_rows), **{f"kept/{label}": entry["kept"] for label, entry in reports.items()}}
    run_info = {"dataset": {"path": os.path.abspath(str(output.final / PAIRS_FILE)),
                            "sha256": sha256_file(staging / PAIRS_FILE), "rows": len(all_rows)}}
    output.finalize(run_info, metrics, to_dict(script_args))
    logger.info("wrote %d pairs to %s", len(all_rows), output.final / PAIRS_FILE)
    return manifest


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
