"""The benchmarks `eval_benchmark.py` scores, in one place: one module each, listed once in `BENCHMARKS`.

A benchmark module holds what is true of that benchmark and nothing about the model scoring it:
    NAME              the `--benchmark` value ("v1", "rm-bench", …)
    TITLE, HEADLINE   its name in the summary table, and what its one number is ("4-section mean")
    GROUP             True: rows of one prompt and several `completions` (each scored alone); False: preference
                      pairs (`prompt`, `chosen`, `rejected` as messages)
    MAX_LENGTH        the reward-model truncation length its own script uses (None: no truncation)
    TRUNCATION_SIDE   "left", or None for the tokenizer's own side
    TRUNCATION_RULE   where that rule comes from (printed in the table)
    DPO_MODE          whether a DPO policy may be scored on it (the benchmark defines an implicit-reward mode)
    detect(records) -> bool                       are these (the first) raw records this benchmark's layout?
    load(paths, split, skip_invalid) -> BenchmarkRows
    summarize(rows, scores, truncated, totals) -> dict
        rows as loaded; `scores` and `truncated` per scored sequence (GROUP: each row's completions in order;
        pairs: every chosen, then every rejected); `totals` the loader's report summed. Returns
        {"results": keys for results.json, "table": text, "metrics": flat numbers, "lines": one dict per row for
         scores.jsonl, "pairs": [(better index, worse index, group)] the diagnostics compare}
    headline_of(results) -> float                 the one number of a results.json (percent)
  optional:
    dpo_groups(row) -> [[completion indices]]     completions whose DPO truncation is decided together
    split_runs(files) -> (runs, skipped)          `--benchmark all`: how its files become runs

A group benchmark scored row by row (RM-Bench, RMB, JudgeBench) may leave out detect, summarize and headline_of and
give their parts instead (`rlhfkit/eval/loading.summarize_rows` puts them together):
    is_record(record) -> bool                     one raw record is this layout (detect: all of the first 100)
    score_rows(rows) -> (result, per-row outcomes); format_table(result) -> str; metrics(result) -> dict
    headline(result) -> float                     the one number of its result (percent)
    diagnostic_pairs(row) -> [(better, worse)]    completion indices the diagnostics compare
    diagnostic_source(row) -> str                 optional: the calibration group (default `default_source`)

Adding a benchmark: write rlhfkit/eval/<name>.py with the attributes above and add it to `BENCHMARKS`.
"""

from __future__ import annotations

from pathlib import Path

from rlhfkit.errors import UserError
from rlhfkit.eval import judgebench, preference_pairs, rewardbench, rewardbench2, rmb, rmbench

# the order of `--benchmark all`'s runs and summary table; `preference_pairs` (any preference file) last
BENCHMARKS = (rewardbench, rewardbench2, rmbench, rmb, judgebench, preference_pairs)
BY_NAME = {module.NAME: module for module in BENCHMARKS}
CHOICES = ("auto", *BY_NAME, "all")
DETECT_SAMPLE = 100  # rows looked at to recognise a layout


def get(name: str):
    if name not in BY_NAME:
        raise ValueError(f"Unknown benchmark: '{name}' (one of {', '.join(BY_NAME)})")
    return BY_NAME[name]


def detects(module, records: list) -> bool:
    """Are these (the first) raw records `module`'s layout? Its `detect`, else all of the first 100 are `is_record`."""
    from rlhfkit.eval.loading import looks_like

    return module.detect(records) if hasattr(module, "detect") else looks_like(records, module.is_record)


def summarize(module, rows: list[dict], scores, truncated, totals: dict) -> dict:
    """`module`'s `summarize` (see the module docstring), else the row-by-row group summary from its parts."""
    from rlhfkit.eval.loading import default_source, summarize_rows

    if hasattr(module, "summarize"):
        return module.summarize(rows, scores, truncated, totals)
    return summarize_rows(rows, scores, truncated, totals, module.NAME, module.score_rows, module.format_table,
                          module.metrics, module.diagnostic_pairs, getattr(module, "diagnostic_source", default_source))


def headline_of(module, results: dict) -> float:
    """The one number (percent) of `module`'s results.json: its `headline_of`, else `headline` of its result."""
    return module.headline_of(results) if hasattr(module, "headline_of") else module.headline(results[module.NAME])


def detect(records: list) -> str:
    """The benchmark a file's rows belong to: the group layouts first (they are the more specific), then v1, then
    plain preference pairs (which accepts anything rlhfkit.data reads)."""
    ordered = [m for m in BENCHMARKS if m.GROUP] + [m for m in BENCHMARKS if not m.GROUP]
    return next(module.NAME for module in ordered if detects(module, records))


def _one_run_per_benchmark(module, files: list[tuple[str, list]]) -> tuple[list[dict], list[dict]]:
    return [{"name": module.NAME, "benchmark": module.NAME, "paths": [f for f, _ in files]}], []


def find_runs(paths: list[str], split: str, skip_invalid: bool) -> tuple[list[dict], list[dict]]:
    """`--benchmark all`: the runs to make ({name, benchmark, paths}, in `BENCHMARKS` order) and the files skipped
    ({file, reason}), from every data file under `paths`."""
    from rlhfkit.eval.loading import data_files
    from rlhfkit.files import read_records

    found: dict[str, list[tuple[str, list]]] = {module.NAME: [] for module in BENCHMARKS}
    skipped = []
    for file in [f for entry in paths for f in data_files(entry)]:
        records = list(read_records(file, split=split, skip_invalid=skip_invalid))
        name = detect(records)
        if name == preference_pairs.NAME:
            skipped.append({"file": file, "reason": "not a benchmark layout (pairs)"})
            continue
        found[name].append((file, records))
    runs = []
    for module in BENCHMARKS:
        if found[module.NAME]:
            split_runs = getattr(module, "split_runs", None)
            made, dropped = (split_runs(found[module.NAME]) if split_runs
                             else _one_run_per_benchmark(module, found[module.NAME]))
            runs += made
            skipped += dropped
    return runs, skipped


def plan_runs(args, dpo: bool) -> tuple[list[dict], list[dict]]:
    """The runs of this invocation (--benchmark, --dataset_path) and the files skipped; one-line errors for what
    cannot be scored (a benchmark without a DPO mode for a DPO policy)."""
    from rlhfkit.files import read_records

    if args.benchmark == "all":
        runs, skipped = find_runs(args.dataset_path, args.dataset_split, args.skip_invalid_rows)
        if dpo:
            for run in [run for run in runs if not get(run["benchmark"]).DPO_MODE]:
                skipped += [{"file": f, "reason": f"{get(run['benchmark']).TITLE} has no DPO (implicit reward) mode"}
                            for f in run["paths"]]
            runs = [run for run in runs if get(run["benchmark"]).DPO_MODE]
        if not runs:
            raise UserError(f"{', '.join(args.dataset_path)}: no "
                            f"{', '.join(m.TITLE for m in BENCHMARKS if m is not preference_pairs)} file found")
        return runs, skipped
    name = args.benchmark
    if name == "auto":
        name = detect(list(read_records(args.dataset_path[0], split=args.dataset_split,
                                        skip_invalid=args.skip_invalid_rows)))
    if dpo and not get(name).DPO_MODE:
        raise UserError(f"{get(name).TITLE} has no DPO (implicit reward) mode (scripts/run_v2.py scores reward models "
                        "only); drop --ref_model_path / --ref_free or use --benchmark v1|pairs")
    return [{"name": name, "benchmark": name, "paths": list(args.dataset_path)}], []


def headline_rows(results: dict) -> int:
    return results.get("rows", results.get("pairs", 0))


def summary_rows(runs: list[dict], results: dict, output_dir: Path) -> list[dict]:
    return [{"name": run["name"], "benchmark": run["benchmark"], "files": len(run["paths"]),
             "rows": headline_rows(results[run["name"]]), "score": headline_of(get(run["benchmark"]), results[run["name"]]),
             "what": get(run["benchmark"]).HEADLINE, "output_dir": str(output_dir / run["name"])} for run in runs]


def format_summary(summary: list[dict], skipped: list[dict]) -> str:
    lines = [f"{'benchmark':<40}{'files':>6}{'rows':>8}{'score':>9}   (score)"]
    for row in summary:
        title = get(row["benchmark"]).TITLE + (f" ({row['name'].split('-', 1)[1]})" if row["name"] != row["benchmark"]
                                               else "")
        lines.append(f"{title:<40}{row['files']:>6}{row['rows']:>8}{row['score']:>9.2f}   ({row['what']})")
    for item in skipped:
        lines.append(f"skipped {item['file']}: {item['reason']}")
    return "\n".join(lines)
