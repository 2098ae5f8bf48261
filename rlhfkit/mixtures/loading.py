"""Reading a public source: a local copy with the hub's column names (file or directory), or the hub itself at the
source's pinned revision (`rlhfkit.mixtures.catalog.SOURCES`); the revision record that manifest.json keeps.

Files are read by `rlhfkit.files.read_records` (the one reader of data files) and recognised by its
`DATA_SUFFIXES`. Rows come back as `sources.Record`s: the row, where it came from, and its stable key.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from rlhfkit.files import DATA_SUFFIXES, read_records
from rlhfkit.errors import UserError
from rlhfkit.mixtures.catalog import SOURCES, SelectionOptions
from rlhfkit.mixtures.sources import Record


# ---------------------------------------------------------------------------------------------------------------
# reading sources: local copies (same column names as the hub) or the hub itself
# ---------------------------------------------------------------------------------------------------------------
def data_files(path: Path, split: str) -> list[Path]:
    """A file itself; in a directory, files named '<split>*' (the hub layouts), else every data file; sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: not found")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES)
                   and not p.name.startswith("."))
    by_split = [p for p in files if p.name.startswith(split)]
    chosen = by_split or files
    if not chosen:
        raise UserError(f"{path}: no data files ({', '.join(DATA_SUFFIXES)}) in this directory")
    return chosen


def find_local_copy(source_dir: str | None, key: str) -> str | None:
    """`<source_dir>/<key>` as a directory or as `<key>.jsonl|.jsonl.gz|.json|.parquet`."""
    if not source_dir:
        return None
    base = Path(source_dir)
    if (base / key).is_dir():
        return str(base / key)
    for suffix in DATA_SUFFIXES:
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
        files = data_files(path, split)
        for file in files:
            subset = None
            if key == "hh_rlhf" and path.is_dir():
                subset = file.relative_to(path).parts[0] if len(file.relative_to(path).parts) > 1 else None
                if subset is not None and subset not in options.hh_rlhf_subsets:
                    continue
            if key == "lmflow":
                from rlhfkit.mixtures.lmflow import read_lmflow_instances

                rows = read_lmflow_instances(file, expect="paired")
            else:
                rows = read_records(file)
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
