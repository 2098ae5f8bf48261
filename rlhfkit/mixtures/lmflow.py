"""LMFlow interoperability: its reward-modelling and SFT JSON files ↔ our canonical rows.

LMFlow formats (LMFlow `examples/reward_modeling` and data docs):
  paired (reward modelling):  {"instances": [{"positive": TEXT, "negative": TEXT}, ...]}
  SFT:                        {"type": "text_only", "instances": [{"text": TEXT}, ...]}
where TEXT is a whole dialogue written as "###Human: <user>###Assistant: <assistant>###Human: ...".
Ours: canonical pair rows {"prompt", "chosen", "rejected", ...} and SFT rows {"messages": [...]} (docs/internals.md).

Written by hand: LMFlow is a whole training framework, too heavy to depend on for two JSON layouts.

Round trip is exact: export writes "<tag> " + content, import strips the tag and exactly one following space.
A system message (which LMFlow's text format has no place for) is written as "###System: <content>" at the
start, an extension that LMFlow itself reads as plain text. Contents that contain a tag cannot be written
unambiguously and are refused with the row's id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from rlhfkit.data import FORMATS_BY_NAME, LMFLOW_ROLE_TAGS, LMFLOW_TAG, RowError, is_valid_prompt, parse_lmflow_text
from rlhfkit.errors import UserError, where

ROLE_TAGS = LMFLOW_ROLE_TAGS


# ---------------------------------------------------------------------------------------------------------------
# text ↔ messages (the parser is rlhfkit.data.parse_lmflow_text, which the preference loader also uses)
# ---------------------------------------------------------------------------------------------------------------
def render_text(messages: Sequence[dict], context: str = "row") -> str:
    """Messages → LMFlow dialogue text."""
    parts = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_TAGS:
            raise UserError(f"{context}: role '{role}' has no LMFlow tag (system, user, assistant)")
        if not isinstance(content, str):
            raise UserError(f"{context}: message content must be a string")
        if LMFLOW_TAG.search(content):
            raise UserError(f"{context}: a message contains an LMFlow role tag ('###Human:' or similar), "
                            f"so the text could not be split back into messages")
        parts.append(f"{ROLE_TAGS[role]} {content}")
    return "".join(parts)


def parse_text(text: str, context: str = "text") -> list[dict]:
    """LMFlow dialogue text → messages (exact: the inverse of `render_text`)."""
    try:
        return parse_lmflow_text(text)
    except RowError as exc:
        raise UserError(f"{context}: {exc.message}") from None


# ---------------------------------------------------------------------------------------------------------------
# per-row conversions
# ---------------------------------------------------------------------------------------------------------------
def pair_to_instance(row: dict, context: str = "row") -> dict:
    """Canonical pair row → {"positive", "negative"} (prompt + response each)."""
    return {"positive": render_text(row["prompt"] + row["chosen"], context),
            "negative": render_text(row["prompt"] + row["rejected"], context)}


def instance_to_pair(instance: dict, loc: tuple = ("lmflow", None)) -> dict:
    """{"positive", "negative"} → canonical pair row, by the preference loader's "lmflow" format (both texts must
    share the dialogue before the replies). Contents are kept exactly, even empty ones, so files round-trip."""
    if not isinstance(instance, dict):
        raise UserError(f"{where(*loc)}: an instance must be an object with 'positive' and 'negative'")
    lmflow = FORMATS_BY_NAME["lmflow"]
    try:
        prompt, chosen, rejected = lmflow.pair(instance, lmflow)
    except RowError as exc:
        raise UserError(f"{where(*loc, exc.field)}: {exc.message}") from None
    if not is_valid_prompt(prompt) or any(m["role"] != "assistant" for m in chosen + rejected):
        raise UserError(f"{where(*loc, 'positive')}: turns must alternate ###Human:/###Assistant: "
                        f"(optionally after one ###System:)")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def sft_to_instance(row: dict, context: str = "row") -> dict:
    return {"text": render_text(row["messages"], context)}


def instance_to_sft(instance: dict, loc: tuple = ("lmflow", None)) -> dict:
    if not isinstance(instance, dict) or not isinstance(instance.get("text"), str):
        raise UserError(f"{where(*loc, 'text')}: missing or not a string")
    return {"messages": parse_text(instance["text"], where(*loc, "text"))}


# ---------------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------------
def read_lmflow_instances(path: str | os.PathLike, expect: str) -> list[dict]:
    """The `instances` of an LMFlow JSON file; `expect` is 'paired' or 'text_only'."""
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except FileNotFoundError:
        raise UserError(f"{path}: LMFlow file not found") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: byte {exc.start}: not valid UTF-8; re-encode the file as UTF-8") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not an LMFlow JSON file") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        raise UserError(f"{path}: an LMFlow file is an object with an 'instances' list")
    kind = payload.get("type")
    if expect == "text_only" and kind != "text_only":
        raise UserError(f"{path}: field 'type': expected 'text_only' (LMFlow SFT data), found {kind!r}")
    if expect == "paired" and kind == "text_only":
        raise UserError(f"{path}: this is LMFlow SFT data (type 'text_only'), not paired positive/negative data")
    return payload["instances"]


def _write_json(path: str | os.PathLike, payload: dict) -> None:
    from rlhfkit.files import write_text_atomic

    write_text_atomic(path, json.dumps(payload, ensure_ascii=False, indent=None) + "\n")


def export_pairs(rows: Iterable[dict], path: str | os.PathLike) -> int:
    instances = [pair_to_instance(row, f"{path}: row {row.get('id', number)}") for number, row in enumerate(rows, start=1)]
    _write_json(path, {"instances": instances})
    return len(instances)


def import_pairs(path: str | os.PathLike) -> list[dict]:
    return [instance_to_pair(instance, (str(path), number))
            for number, instance in enumerate(read_lmflow_instances(path, "paired"), start=1)]


def export_sft(rows: Iterable[dict], path: str | os.PathLike) -> int:
    instances = [sft_to_instance(row, f"{path}: row {number}") for number, row in enumerate(rows, start=1)]
    _write_json(path, {"type": "text_only", "instances": instances})
    return len(instances)


def import_sft(path: str | os.PathLike) -> list[dict]:
    return [instance_to_sft(instance, (str(path), number))
            for number, instance in enumerate(read_lmflow_instances(path, "text_only"), start=1)]


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> int:
    from rlhfkit.files import write_text_atomic

    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)


def convert_file(kind: str, direction: str, source: str, target: str) -> int:
    """`kind` pairs|sft, `direction` export (our JSONL → LMFlow JSON) or import (LMFlow JSON → our JSONL)."""
    if direction == "export":
        rows: Any = _read_any(source)
        return export_pairs(rows, target) if kind == "pairs" else export_sft(rows, target)
    rows = import_pairs(source) if kind == "pairs" else import_sft(source)
    return write_jsonl(rows, target)


def _read_any(path: str) -> list[dict]:
    from rlhfkit.files import read_records

    return read_records(path)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m rlhfkit.mixtures.lmflow {export,import} {pairs,sft} SOURCE TARGET`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m rlhfkit.mixtures.lmflow", description=main.__doc__ + "\n\n" + __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["export", "import"])
    parser.add_argument("kind", choices=["pairs", "sft"])
    parser.add_argument("source")
    parser.add_argument("target")
    args = parser.parse_args(argv)
    try:
        count = convert_file(args.kind, args.direction, args.source, args.target)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {count} rows to {args.target}")


if __name__ == "__main__":
    main()
