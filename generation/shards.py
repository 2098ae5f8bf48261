"""Shard files of a generation run: crash-safe appends, resume, and the merge into one prompt-ordered file.

Layout while a run is in progress (`OUT.partial/`, the stage contract of `rlhfkit.checkpoints`):
    shard-00000-of-00002.jsonl       rows of shard 0, appended one batch at a time
    shard-00000-of-00002.done.json   written when shard 0 has all its prompts: its assignment and throughput
After the merge: `OUT/generations.jsonl` in prompt-set order, plus metrics.json, args.yaml, run_info.json.

Appends are whole lines written in one `write`, flushed and fsynced, so a kill leaves at most one torn last line;
`ShardFile.open_for_append` cuts it off and returns the rows already complete, so a rerun skips exactly those.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from rlhfkit.files import write_json_atomic
from rlhfkit.locks import RunLock
from rlhfkit.errors import UserError, where

OUTPUT_FILE = "generations.jsonl"


def shard_name(index: int, world_size: int) -> str:
    return f"shard-{index:05d}-of-{world_size:05d}"


def assigned_indices(num_prompts: int, index: int, world_size: int) -> list[int]:
    """Prompt indices of shard `index`: every `world_size`-th prompt (a split by index, so reruns agree)."""
    if not 0 <= index < world_size:
        raise UserError(f"--local_index {index} must be in [0, --world_size {world_size})")
    return list(range(index, num_prompts, world_size))


class ShardFile:
    """One shard's JSONL file, appended atomically per batch."""

    def __init__(self, directory: str | os.PathLike, index: int, world_size: int):
        self.directory = Path(directory)
        self.index, self.world_size = index, world_size
        self.path = self.directory / f"{shard_name(index, world_size)}.jsonl"
        self.done_path = self.directory / f"{shard_name(index, world_size)}.done.json"
        self.lock_path = self.directory / f"{shard_name(index, world_size)}.lock"
        self._handle = None
        self._lock: RunLock | None = None
        self._guard = None

    def open_for_append(self, discard: bool = False) -> list[dict]:
        """Open for appending; return the complete rows already there (after cutting a torn last line).

        Takes the shard's lock first: a second process writing the same shard file is refused with one line naming
        the holder; a lock left by a killed process is taken over (a rerun always resumes a shard). Installs the
        preemption handler: on SIGTERM/SIGUSR1 the batch in progress is finished and appended, then the process stops
        (`rlhfkit.faults.Preempted`, exit 75) and a rerun continues after the rows written."""
        from rlhfkit.faults import PreemptionGuard

        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(self.lock_path, what=f"generation process for shard {self.index} of {self.world_size}")
        self._lock.acquire(takeover=True, stage="generate")
        self._guard = PreemptionGuard()
        rows: list[dict] = []
        if discard:
            self.path.unlink(missing_ok=True)
            self.done_path.unlink(missing_ok=True)
        elif self.path.exists():
            rows, good_bytes = read_rows(self.path, allow_torn_tail=True)
            if good_bytes != self.path.stat().st_size:
                with open(self.path, "r+b") as handle:  # drop the torn line before appending after it
                    handle.truncate(good_bytes)
        self._handle = open(self.path, "a", encoding="utf-8")
        return rows

    def append(self, rows: Iterable[dict]) -> None:
        payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if not payload:
            return
        self._handle.write(payload)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        if self._guard is not None and self._guard.requested:
            rows_written = len(read_rows(self.path, allow_torn_tail=True)[0])
            guard = self._guard
            self.close()
            guard.exit(rows_written, self.path, what=f"after {rows_written} rows of shard {self.index} were "
                             f"written to {self.path} (flushed)", resume_hint="rerun the same command to continue")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._guard is not None:
            self._guard.uninstall()
            self._guard = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def mark_done(self, record: dict) -> None:
        write_json_atomic(self.done_path, record)


def read_rows(path: str | os.PathLike, allow_torn_tail: bool = False) -> tuple[list[dict], int]:
    """Rows of a JSONL shard and the byte length of its complete lines.

    A last line that is unterminated or not valid JSON is a torn write: ignored when `allow_torn_tail`, an error
    otherwise. A bad line anywhere else is damage no rerun should paper over.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: the shard file disappeared while being read (removed by another process?)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    lines = data.split(b"\n")
    rows: list[dict] = []
    offset = 0
    for number, line in enumerate(lines, start=1):
        is_last = number == len(lines)
        if is_last and line == b"":
            break
        try:
            if is_last:  # no terminating newline: the write did not finish
                raise ValueError("a torn last line (no newline: the write did not finish)")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"not valid UTF-8 at byte offset {offset + exc.start}") from None
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if (is_last or (number == len(lines) - 1 and lines[-1] == b"")) and allow_torn_tail:
                break
            raise UserError(f"{where(path, number)}: damaged line in a generation shard: {exc}") from None
        rows.append(row)
        offset += len(line) + 1
    return rows, offset


def merge_shards(directory: str | os.PathLike, world_size: int, expected_ids: Sequence[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Rows of all shards of `world_size`, in prompt-set order, checked complete and unique.

    Every shard must have its done record. The ids written must equal the ids assigned (no gaps, no duplicates,
    nothing extra); `expected_ids` (the prompt set, in order) is checked against the assignments too.
    Returns (rows, done records).
    """
    directory = Path(directory)
    done_records, assigned, written = [], {}, {}
    for index in range(world_size):
        shard = ShardFile(directory, index, world_size)
        if not shard.done_path.exists():
            state = "has not finished" if shard.path.exists() else "has not started"
            raise UserError(
                f"{directory}: shard {index} of {world_size} {state} (run generate.py --local_index {index} "
                f"--world_size {world_size} with the same arguments)"
            )
        try:
            done = json.loads(shard.done_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{shard.done_path}: unreadable shard record ({type(exc).__name__}); rerun generate.py "
                            f"--local_index {index} --world_size {world_size} to rewrite it") from None
        done_records.append(done)
        for position, row_id in done["assigned"]:
            if row_id in assigned:
                raise UserError(f"{shard.done_path}: prompt id '{row_id}' is assigned to two shards")
            assigned[row_id] = position
        rows, _ = read_rows(shard.path)
        for number, row in enumerate(rows, start=1):
            row_id = row.get("id")
            if row_id in written:
                raise UserError(f"{where(shard.path, number, 'id')}: prompt '{row_id}' written twice")
            if row_id not in assigned or assigned[row_id] is None:
                raise UserError(f"{where(shard.path, number, 'id')}: prompt '{row_id}' is not in this shard's assignment")
            written[row_id] = row
    missing = [row_id for row_id in assigned if row_id not in written]
    if missing:
        raise UserError(f"{directory}: {len(missing)} assigned prompt(s) have no generations (first: '{missing[0]}')")
    if expected_ids is not None:
        expected = list(expected_ids)
        absent = [row_id for row_id in expected if row_id not in written]
        extra = sorted(set(written) - set(expected))
        if absent:
            raise UserError(f"{directory}: {len(absent)} prompt(s) of the prompt set are missing (first: '{absent[0]}')")
        if extra:
            raise UserError(f"{directory}: {len(extra)} generated prompt id(s) are not in the prompt set (first: '{extra[0]}')")
        return [written[row_id] for row_id in expected], done_records
    return [written[row_id] for row_id in sorted(written, key=lambda i: assigned[i])], done_records


def throughput(done_records: Sequence[dict]) -> dict:
    """Totals over shards; tokens/s counts shards as running in parallel (the slowest one sets the wall time)."""
    tokens = sum(d.get("generated_tokens", 0) for d in done_records)
    seconds = max((d.get("seconds", 0.0) for d in done_records), default=0.0)
    return {
        "generated_tokens": tokens,
        "generation_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
        "shards": len(done_records),
    }


def remove_shards(directory: str | os.PathLike, world_size: int) -> None:
    """Delete merged shard files so the finished dir holds one generations file (readers of a dir read all)."""
    for index in range(world_size):
        shard = ShardFile(directory, index, world_size)
        shard.path.unlink(missing_ok=True)
        shard.done_path.unlink(missing_ok=True)
        shard.lock_path.unlink(missing_ok=True)  # left only by a killed process
