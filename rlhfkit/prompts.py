"""Prompt sets: the input of `generation/generate.py` and `ppo_train.py`.

`load_prompts` returns canonical prompt rows `{"id": str, "prompt": [messages ending with a user turn]}` from, per
row of each source (a local file or directory that `rlhfkit.files.read_records` reads, or a hub dataset name):

    messages / prompt: a message list   a trailing assistant turn (the dataset's answer) is dropped
    prompt: a string                    one user turn (an optional `system` string field becomes a system turn)
    instruction [+ input] / question    one user turn (Alpaca's input is appended after a blank line)
    chosen/rejected (a preference set)  the prompts of `rlhfkit.data.load_preferences`, deduplicated, with
                                        content-hash ids (a pair's id names the pair, not its prompt)

Ids: the row's `id` when given (as a string), else a content hash of the prompt, so they are stable across runs
and independent of row order (generation resumes and shards by id). Rows with an id seen before are dropped when
their prompt is the same (counted as duplicates) and refused when it differs. The counts are in `.report`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from .checkpoints import fingerprint
from .data import (RowError, as_messages, convert_records, is_preference_row, load_preferences, parse_source, read_records,
                   validate_turns)
from .errors import UserError, where

logger = logging.getLogger(__name__)

class PromptSet(list):
    """A list of prompt rows with a `report` of what loading read, kept and dropped, per source."""

    def __init__(self, rows=(), report: dict | None = None):
        super().__init__(rows)
        self.report = report or {}


def prompt_id(messages: Sequence[dict]) -> str:
    """Content id of a prompt: 16 hex digits of the SHA-256 of its canonical JSON."""
    return fingerprint(list(messages))


def row_to_prompt(row: dict) -> list[dict]:
    """The prompt messages of one non-preference row (pure). Raises `RowError` naming the field at fault."""
    for key in ("messages", "prompt"):
        if key in row and row[key] is not None:
            value = row[key]
            if isinstance(value, str):
                messages = [{"role": "user", "content": value}]
                if isinstance(row.get("system"), str) and row["system"].strip():
                    messages.insert(0, {"role": "system", "content": row["system"]})
            else:
                messages = as_messages(value, key, "user")
                if messages and messages[-1]["role"] == "assistant":
                    messages = messages[:-1]
            validate_turns(messages, key, "prompt")
            return messages
    for key in ("instruction", "question"):
        if key in row and row[key] is not None:
            if not isinstance(row[key], str):
                raise RowError(key, f"must be a string, got {type(row[key]).__name__}")
            content = row[key]
            extra = row.get("input") if key == "instruction" else None
            if isinstance(extra, str) and extra.strip():
                content = f"{content}\n\n{extra}"
            messages = [{"role": "user", "content": content}]
            validate_turns(messages, key, "prompt")
            return messages
    found = sorted(k for k in row if not str(k).startswith("_"))
    raise RowError("prompt", f"missing (a prompt row needs messages, prompt, instruction or question; found {found})")


def load_prompts(
    paths: Sequence[str] | str,
    split: str = "train",
    max_prompts: int | None = None,
    skip_invalid: bool = False,
    keep_fields: Sequence[str] = (),
) -> PromptSet:
    """Prompt rows of every source, in file order, deduplicated by id (see the module docstring).

    `paths` entries may carry `:N` / `:0.25` suffixes as in `rlhfkit.data.parse_source` (taken as the first N
    rows, or that fraction, in file order). `max_prompts` keeps the first N prompts overall. `keep_fields`: columns
    copied from each row, when present, into its prompt row (e.g. `answer` for `ppo_train.py --reward_fn
    exact_answer`).
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise UserError("no prompt set given (--dataset_path)")
    rows: list[dict] = []
    seen: dict[str, tuple[list, str]] = {}
    report: dict[str, dict] = {}
    for spec_text in paths:
        spec = parse_source(spec_text)
        records = read_records(spec.path, split=split, skip_invalid=skip_invalid, hint=False)
        counts: Counter = Counter(read=len(records) + sum(records.skipped.values()), **records.skipped)
        candidates: list[tuple[str, list[dict], str | None, dict]] = []  # (where, prompt, given id, kept columns)
        if records and is_preference_row(records[0]):
            counts["format_preference"] = 1
            data = load_preferences([spec.path], skip_invalid=skip_invalid, split=split)
            for number, pref in enumerate(data.rows, start=1):
                # a pair's id names the pair, not its prompt, and many pairs share a prompt: hash the content
                candidates.append((where(spec.path, number), pref["prompt"], None, {}))
        else:
            converted = convert_records(spec.path, records, row_to_prompt, skip_invalid, counts, hint_skip_flag=False)
            for number, record, messages in converted:
                given = record.get("id")
                extra = {key: record[key] for key in keep_fields if key in record}
                candidates.append((where(spec.path, number), messages, None if given is None else str(given), extra))
        if spec.count is not None or spec.fraction is not None:
            want = spec.count if spec.count is not None else round(spec.fraction * len(candidates))
            counts["dropped_limit"] += max(0, len(candidates) - want)
            candidates = candidates[:want]
        kept = 0
        for location, messages, given, extra in candidates:
            row_id = given if given is not None else prompt_id(messages)
            if row_id in seen:
                first_messages, first_location = seen[row_id]
                if first_messages != messages:
                    raise UserError(
                        f"{location}: field 'id': '{row_id}' is also the id of a different prompt at {first_location}; "
                        f"ids must be unique (drop the 'id' field to use content hashes)"
                    )
                counts["dropped_duplicate"] += 1
                continue
            seen[row_id] = (messages, location)
            rows.append({"id": row_id, "prompt": messages, **extra})
            kept += 1
        counts["kept"] = kept
        report[spec_text] = dict(counts)
    if max_prompts is not None and len(rows) > max_prompts:
        report["max_prompts"] = {"dropped": len(rows) - max_prompts}
        rows = rows[:max_prompts]
    if not rows:
        raise UserError(f"{', '.join(paths)}: no prompts found")
    for source, counts in report.items():
        details = ", ".join(f"{k}={v}" for k, v in counts.items() if k not in ("read", "kept"))
        logger.info("prompts: %s: read %s, kept %s%s", source, counts.get("read", "-"), counts.get("kept", "-"),
                    f" ({details})" if details else "")
    return PromptSet(rows, report)
