"""Reading and writing data files: the one reader of every data file the toolkit takes (preference, prompt, SFT,
generation and annotation files; `.jsonl`, `.jsonl.gz`, `.json`, `.json.gz`, `.parquet`, directories of them,
`save_to_disk` directories, hub names), and the atomic JSONL writer.

Every fault of a file becomes one line naming the file and the row or byte offset (`UserError`, exit 2): invalid
UTF-8, truncated or corrupt compression, a torn last line, a `.json` that ends early, a parquet that is not one, a
broken `save_to_disk` directory, a file that vanishes mid-read. With `skip_invalid`, row-level faults are skipped and
counted in `Records.skipped`; damaged files always stop the run. What the rows mean is `rlhfkit.data`'s business.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import tempfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import UserError, where

logger = logging.getLogger(__name__)

# The file suffixes every reader of data files accepts (read_records; prepare_data's source lookup).
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


class Records(list):
    """Rows of one source as `read_records` returns them, plus `skipped`: the row-level read faults (a line that is
    not valid UTF-8 or JSON, a torn last line, a line that is not an object) skipped and counted under
    `skip_invalid`, as `skipped_invalid_utf8`, `skipped_invalid_json`, `skipped_torn_last_line`, `skipped_not_object`."""

    def __init__(self, rows=(), skipped: Counter | None = None):
        super().__init__(rows)
        self.skipped: Counter = Counter(skipped or {})


_SKIP_HINT = " (or pass --skip_invalid_rows true to skip and count such rows)"
# what gzip/zlib raise for a truncated or corrupt stream (BadGzipFile is also an OSError: catch these first)
_COMPRESSION_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _os_error(path: Path, exc: OSError, position: str = "") -> UserError:
    """A filesystem error while reading `path` as one line (`position`: ': row N' or ': byte offset B' reached)."""
    if isinstance(exc, FileNotFoundError):
        return UserError(f"{path}{position}: the file disappeared while being read (was it moved or rewritten by "
                         f"another process?)")
    if isinstance(exc, IsADirectoryError):
        return UserError(f"{path}: is a directory, not a data file")
    return UserError(f"{path}{position}: cannot read ({exc.strerror or _first_line(exc)})")


def _compression_error(path: Path, exc: BaseException, rows: int, offset: int) -> UserError:
    what = ("ends early (truncated: the compressed stream has no end marker)" if isinstance(exc, EOFError)
            else f"is damaged ({_first_line(exc)})")
    return UserError(f"{path}: byte offset {offset} of the decompressed data, after row {rows}: the gzip data {what}; "
                     f"re-create or re-download the file")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_jsonl(path: Path, skip_invalid: bool = False, skipped: Counter | None = None, hint: bool = True) -> list[dict]:
    """Rows of a .jsonl/.jsonl.gz file, read as bytes so that every fault is placed: a line that is not UTF-8 or not
    JSON (row N), a torn last line (no newline, not JSON: an interrupted write), truncated or corrupt gzip data
    (byte offset), the file vanishing. Row-level faults are skipped and counted under `skip_invalid`."""
    mine: Counter = Counter()  # this file's skips (logged), added to `skipped` (the whole source's)
    rows: list[dict] = []
    number = offset = 0
    try:
        with _open_binary(path) as handle:
            for raw in handle:
                number += 1
                start, offset = offset, offset + len(raw)
                fault = None
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # tolerate a BOM
                except UnicodeDecodeError as exc:
                    fault = ("invalid_utf8", f"not valid UTF-8 (byte {start + exc.start} of the "
                             f"{'decompressed ' if path.name.lower().endswith('.gz') else ''}file); "
                             f"re-encode the file as UTF-8")
                else:
                    if not text.strip():
                        continue
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError as exc:
                        if not raw.endswith(b"\n"):
                            fault = ("torn_last_line", "the last line is cut short (no newline, not valid JSON): "
                                     "the file was truncated, perhaps by an interrupted write")
                        else:
                            fault = ("invalid_json", f"not valid JSON ({exc.msg})")
                    else:
                        if not isinstance(row, dict):
                            fault = ("not_object", f"each line must be a JSON object, got {type(row).__name__}")
                if fault is not None:
                    if skip_invalid:
                        mine[f"skipped_{fault[0]}"] += 1
                        continue
                    raise UserError(f"{where(path, number)}: {fault[1]}{_SKIP_HINT if hint else ''}")
                rows.append(row)
    except _COMPRESSION_ERRORS as exc:
        raise _compression_error(path, exc, len(rows), offset) from None
    except OSError as exc:
        raise _os_error(path, exc, f": row {number + 1}" if number else "") from None
    if mine:
        logger.warning("%s: skipped damaged lines (--skip_invalid_rows): %s", path,
                       ", ".join(f"{k.removeprefix('skipped_')}={v}" for k, v in sorted(mine.items())))
        if skipped is not None:
            skipped.update(mine)
    return rows


def _read_json(path: Path) -> list[dict]:
    """Rows of a .json/.json.gz file: a list of rows, LMFlow `{"type", "instances"}`, or equal-length columns."""
    try:
        with _open_binary(path) as handle:
            data = handle.read()
    except _COMPRESSION_ERRORS as exc:
        raise _compression_error(path, exc, 0, 0) from None
    except OSError as exc:
        raise _os_error(path, exc) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}: line {line} (byte {exc.start}): not valid UTF-8; re-encode the file as UTF-8") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        # an unterminated string runs to the end of the file (a newline in a string is another error)
        ends_early = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        why = "the file ends early (truncated?)" if ends_early else f"not valid JSON ({exc.msg})"
        raise UserError(f"{path}: line {exc.lineno}: {why}") from None
    if isinstance(payload, dict) and "instances" in payload:  # LMFlow: {"type": ..., "instances": [...]}
        rows = payload["instances"]
        if not isinstance(rows, list):
            raise UserError(f"{path}: field 'instances' must be a list")
        kind = payload.get("type")
        return [dict(row, _lmflow_type=kind) if isinstance(row, dict) else row for row in rows]
    if isinstance(payload, dict):  # columnar {"chosen": [...], "rejected": [...]}
        lengths = {len(value) for value in payload.values() if isinstance(value, list)}
        if len(lengths) == 1 and all(isinstance(value, list) for value in payload.values()):
            keys = list(payload)
            return [{key: payload[key][i] for key in keys} for i in range(lengths.pop())]
        raise UserError(f"{path}: a JSON file must hold a list of rows, LMFlow 'instances', or equal-length columns")
    if not isinstance(payload, list):
        raise UserError(f"{path}: a JSON file must hold a list of rows")
    return payload


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except FileNotFoundError as exc:
        raise _os_error(path, exc) from None
    except Exception as exc:  # pyarrow raises ArrowInvalid, ArrowIOError, OSError… for files that are not parquet
        raise UserError(f"{path}: not a readable parquet file (pyarrow: {_first_line(exc)})") from None
    try:
        return table.to_pylist()
    except Exception as exc:  # e.g. a string column holding invalid UTF-8
        raise UserError(f"{path}: parquet data cannot be decoded (pyarrow: {_first_line(exc)})") from None


def _read_saved_dataset(path: Path, split: str) -> list[dict]:
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:  # missing or damaged arrow shards, bad dataset_info.json
        raise UserError(f"{path}: not a readable save_to_disk dataset ({type(exc).__name__}: {_first_line(exc)})") from None
    if hasattr(dataset, "keys"):
        if split not in dataset:
            raise UserError(f"{path}: split '{split}' not found (has {sorted(dataset.keys())})")
        dataset = dataset[split]
    rows: list[dict] = []
    try:
        for row in dataset:
            rows.append(dict(row))
    except Exception as exc:  # an arrow file truncated or removed under us
        raise UserError(f"{path}: row {len(rows) + 1}: cannot be read ({type(exc).__name__}: {_first_line(exc)})") from None
    return rows


def read_records(path: str | os.PathLike, split: str = "train", skip_invalid: bool = False,
                 hint: bool = True) -> Records:
    """Rows of a local .jsonl/.jsonl.gz/.json/.json.gz/.parquet file, a directory of them, a `save_to_disk` dir,
    or a hub dataset name (`datasets.load_dataset`). Rows are returned as dicts; numbering in errors is 1-based.

    The one reader of data files for every stage: any fault (not UTF-8, not JSON, a torn last line, truncated or
    corrupt gzip, a parquet that is not one, a file vanishing or unreadable) is a one-line `UserError` naming the
    file and the row or byte offset. With `skip_invalid` the row-level faults of JSONL files are skipped instead and
    counted in the result's `skipped`; file-level faults always stop. `hint`: end row-level messages with the
    `--skip_invalid_rows` hint (for callers whose stage has the flag)."""
    skipped: Counter = Counter()
    rows = _read_any(Path(path), split, skip_invalid, skipped, hint)
    return Records(rows, skipped)


def _read_any(path: Path, split: str, skip_invalid: bool, skipped: Counter, hint: bool) -> list[dict]:
    name = path.name.lower()
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except OSError as exc:
        raise _os_error(path, exc) from None
    if is_dir:
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _read_saved_dataset(path, split)
        suffixes = DATA_SUFFIXES
        if (path / "run_info.json").exists():  # a stage's output dir: its .json files are metadata, not rows
            suffixes = tuple(s for s in DATA_SUFFIXES if not s.startswith(".json."))
            suffixes = tuple(s for s in suffixes if s != ".json")
        try:
            files = sorted(p for p in path.rglob("*") if p.name.lower().endswith(suffixes)
                           and not p.name.startswith(".") and p.is_file())
        except OSError as exc:
            raise _os_error(path, exc) from None
        if not files:
            raise UserError(f"{path}: directory has no {', '.join(DATA_SUFFIXES)} files")
        rows: list[dict] = []
        for file in files:
            rows.extend(_read_any(file, split, skip_invalid, skipped, hint))
        return rows
    if exists:
        if name.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(path, skip_invalid, skipped, hint)
        if name.endswith((".json", ".json.gz")):
            return _read_json(path)
        if name.endswith(".parquet"):
            return _read_parquet(path)
        raise UserError(f"{path}: unsupported file type (use {', '.join(DATA_SUFFIXES)} or a directory)")
    text = str(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith("."):
        return _read_hub(text, split)
    raise UserError(f"{path}: file not found")


def _read_hub(name: str, split: str) -> list[dict]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split)
    except Exception as exc:  # offline, missing, gated: all end the same way for the user
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{name}: cannot load hub dataset split '{split}' ({first}); pass a local copy instead") from None
    return [dict(row) for row in dataset]


# Atomic writes: a temp file in the same directory, renamed into place, so a reader never sees half a file.
def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write rows as JSONL to a temp file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    opener = gzip.open if path.name.endswith(".gz") else open
    os.close(fd)
    os.chmod(tmp, default_file_mode())
    with opener(tmp, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON to a temp file in the same directory and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, default_file_mode())  # mkstemp makes 0600 files; outputs should read like any other file
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, default_file_mode())
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
