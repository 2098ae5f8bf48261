"""Reading reward-model benchmark files in their published layouts (RM-Bench, RMB, JudgeBench): one file, a
directory of them, or a hub name, every row converted by the benchmark's own `convert` and validated there.

A directory is read file by file (sorted), so an error names the file and the row *within that file*, as the
benchmarks publish one file per domain or scenario (RMB: 98 files). Every row is kept and scored; what is unusual
about a row (empty or identical responses) is counted in the report, never dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from rlhfkit.errors import UserError, where
from rlhfkit.eval.rewardbench import BenchmarkRows
from rlhfkit.files import DATA_SUFFIXES


def data_files(path: str) -> list[str]:
    """`path` itself, or for a plain directory the data files under it (sorted; a `save_to_disk` directory is one
    dataset and stays whole). Hub names pass through."""
    directory = Path(path)
    if not directory.is_dir() or (directory / "dataset_info.json").exists() or (directory / "dataset_dict.json").exists():
        return [str(path)]
    files = sorted(str(p) for p in directory.rglob("*")
                   if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(DATA_SUFFIXES))
    if not files:
        raise UserError(f"{path}: directory has no {', '.join(DATA_SUFFIXES)} files")
    return files


def load_rows(paths: Sequence[str], convert: Callable[[dict, str, str], dict], flags: Callable[[dict], Counter],
              split: str = "train", skip_invalid: bool = False) -> BenchmarkRows:
    """Rows of every file under `paths`: `convert(record, location, file) -> row` raises a one-line UserError for a
    malformed row (`<file>: row <n>: field '<f>': <what>`), which `skip_invalid` turns into a counted skip;
    `flags(row)` adds to the file's report. Each row gets `source` (the file name without suffixes) and `file`."""
    from rlhfkit.files import read_records

    rows: list[dict] = []
    report: dict[str, dict] = {}
    for path in [file for entry in paths for file in data_files(entry)]:
        records = read_records(path, split=split, skip_invalid=skip_invalid)
        counts: Counter = Counter(read=len(records) + sum(records.skipped.values()), **records.skipped)
        name = Path(path).name.split(".")[0] or str(path)
        for number, record in enumerate(records, start=1):
            try:
                if not isinstance(record, dict):
                    raise UserError(f"{where(path, number)}: a row must be a JSON object")
                row = convert(record, where(path, number), path)
            except UserError:
                if not skip_invalid:
                    raise
                counts["skipped_invalid"] += 1
                continue
            row.setdefault("source", name)
            row["file"] = str(path)
            row["row"] = number
            counts.update(flags(row))
            counts["scored"] += 1
            rows.append(row)
        report[str(path)] = dict(counts)
    return BenchmarkRows(rows, report)


def string_field(record: dict, name: str, loc: str, layout: str) -> str:
    """`record[name]` as a string (empty allowed: the benchmarks score empty responses), or a one-line error."""
    if name not in record:
        raise UserError(f"{loc}: field '{name}' is missing ({layout})")
    value = record[name]
    if not isinstance(value, str):
        raise UserError(f"{loc}: field '{name}': must be a string, got {type(value).__name__}")
    return value


def completion_flags(row: dict) -> Counter:
    """Counts shared by the group benchmarks: completions, empty ones, rows where two completions are identical
    (scored as an exact tie, which every one of these benchmarks counts as wrong)."""
    flags: Counter = Counter()
    flags["completions"] += len(row["completions"])
    flags["empty_completions"] += sum(not text.strip() for text in row["completions"])
    if len(set(row["completions"])) < len(row["completions"]):
        flags["rows_with_identical_completions"] += 1
    return flags


# ---------------------------------------------------------------------------------------------------------------
# the part of `summarize` (rlhfkit/eval/benchmarks.py) every group benchmark shares
# ---------------------------------------------------------------------------------------------------------------
def attach_scores(rows: list[dict], scores: Sequence[float]) -> list[int]:
    """Each row's `scores` (its completions' slice of the flat list); returns each row's offset into that list."""
    offsets, cursor = [], 0
    for row in rows:
        offsets.append(cursor)
        row["scores"] = list(scores[cursor : cursor + len(row["completions"])])
        cursor += len(row["completions"])
    return offsets


def looks_like(records: list, is_record: Callable[[dict], bool]) -> bool:
    """`detect` for a benchmark whose records are recognised one by one: all of the first 100 are its layout."""
    sample = records[:100]
    return bool(sample) and all(is_record(r) for r in sample)


def summarize_rows(rows: list[dict], scores: Sequence[float], truncated: Sequence[bool], totals: dict, name: str,
                   score_rows: Callable, format_table: Callable, metrics: Callable,
                   pairs_of: Callable[[dict], list[tuple[int, int]]], source_of: Callable[[dict], str]) -> dict:
    """`summarize` of a group benchmark scored row by row (`score_rows(rows) -> (result, per-row outcomes)`)."""
    offsets = attach_scores(rows, scores)
    result, per_row = score_rows(rows)
    lines = [{"id": row["id"], "subset": row["subset"], "file": row.get("file"), "row": row.get("row"),
              "scores": row["scores"], **outcome} for row, outcome in zip(rows, per_row)]
    return group_summary(rows, offsets, truncated, totals, {name: result}, format_table(result), metrics(result),
                         lines, pairs_of, source_of)


def group_summary(rows: list[dict], offsets: list[int], truncated: Sequence[bool], totals: dict, results: dict,
                  table: str, metrics: dict, lines: list[dict], pairs_of: Callable[[dict], list[tuple[int, int]]],
                  source_of: Callable[[dict], str]) -> dict:
    """`summarize`'s result for a group benchmark: the benchmark's own results, table, metrics and per-row lines,
    plus the counts every group benchmark reports, each line's truncation and the (better, worse) pairs the
    diagnostics compare (flat sequence indices)."""
    completions = sum(len(row["completions"]) for row in rows)
    results = {"rows": len(rows), "completions": completions, **results,
               "empty_completions": totals.get("empty_completions", 0),
               "rows_with_identical_completions": totals.get("rows_with_identical_completions", 0)}
    table += (f"\n\n{'Rows scored':<28}{len(rows):>16}   ({completions} completions; "
              f"{results['empty_completions']} empty, {results['rows_with_identical_completions']} rows with "
              "identical completions; all scored)")
    for row, line, offset in zip(rows, lines, offsets):
        line["truncated"] = [truncated[offset + j] for j in range(len(row["completions"]))]
    pairs = [(offset + i, offset + j, source_of(row)) for row, offset in zip(rows, offsets) for i, j in pairs_of(row)]
    return {"results": results, "table": table, "metrics": metrics, "lines": lines, "pairs": pairs}


def default_source(row: dict) -> str:
    """The group a row's pairs are calibrated under, unless the benchmark names a coarser one."""
    return row.get("domain") or row.get("subset") or "all"
