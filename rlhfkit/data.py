"""Preference data: rows read by `rlhfkit.files.read_records`, converted to the one canonical schema, validated,
sampled per source and reported.

Canonical row (see docs/internals.md):
    {"prompt": [messages ending with a user turn], "chosen": [assistant turn(s)], "rejected": [assistant turn(s)],
     optional "margin": float, "source": str, "subset": str, "id": str}

Input formats, detected per row: the table `PREFERENCE_FORMATS` (each entry: how to recognise it, its chosen and
rejected fields, how to convert it), first match wins:
    lmflow          `{"positive", "negative"}` LMFlow dialogue texts "###Human: …###Assistant: …" (parsed exactly by
                    `parse_lmflow_text`, the one LMFlow parser; usually a file `{"instances": [...]}`)
    explicit        prompt + chosen/rejected, each a string or a message list (TRL explicit prompt, RewardBench rows
                    `prompt, chosen, rejected, subset[, id]`)
    hh_text         chosen/rejected are raw "\\n\\nHuman: … \\n\\nAssistant: …" dialogues (Anthropic HH-RLHF)
    pair_messages   chosen/rejected are whole conversations sharing a prompt (RLHFlow, TRL implicit prompt)
Other modules ask this one: `is_preference_row` (prompt sets), `chosen_conversation` (SFT), `is_valid_prompt` and
`validate_turns` (the canonical turn order).

Every conversion problem raises `UserError("<file>: row <n>: field '<f>': …")` unless `skip_invalid=True`, in which
case the row is skipped and counted; pairs whose chosen equals rejected are always dropped and counted. The counts
are in `PreferenceData.report` and logged at the end of loading.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, where
from .files import DATA_SUFFIXES, Records, read_records, write_jsonl_atomic  # noqa: F401  (read through this module too)

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class RowError(Exception):
    """A problem with one field of one row; the loader adds file and row number."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name
        self.message = message


# ---------------------------------------------------------------------------------------------------------------
# conversion (pure, per row)
# ---------------------------------------------------------------------------------------------------------------
_HH_STRICT = re.compile(r"\n\n(Human|Assistant):")
_HH_HASH = re.compile(r"###\s*(Human|Assistant):")
_HH_LOOSE = re.compile(r"(?:^|(?<=\s))(Human|Assistant):")


def parse_hh_dialogue(text: str, field_name: str = "text") -> list[dict]:
    """Messages of a raw "\\n\\nHuman: … \\n\\nAssistant: …" dialogue (also LMFlow's "###Human:" and one-line forms)."""
    if not isinstance(text, str):
        raise RowError(field_name, f"expected a dialogue string, got {type(text).__name__}")
    body = text if text.startswith("\n\n") else "\n\n" + text
    pattern = _HH_STRICT if _HH_STRICT.search(body) else (_HH_HASH if _HH_HASH.search(text) else _HH_LOOSE)
    source = body if pattern is _HH_STRICT else text
    pieces = pattern.split(source)
    if len(pieces) < 3:
        raise RowError(field_name, "no 'Human:'/'Assistant:' turns found")
    if pieces[0].strip():
        raise RowError(field_name, "text before the first 'Human:' turn")
    messages = []
    for speaker, content in zip(pieces[1::2], pieces[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if messages and messages[-1]["role"] == role:  # HH has a few doubled turns: join rather than fail
            messages[-1]["content"] = (messages[-1]["content"] + "\n\n" + content).strip()
        else:
            messages.append({"role": role, "content": content})
    return messages


def as_messages(value: Any, field_name: str, default_role: str) -> list[dict]:
    """A message list from a string (one turn of `default_role`) or a list of {role, content} dicts."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        raise RowError(field_name, f"expected a string or a list of messages, got {type(value).__name__}")
    out = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError(field_name, f"message {index} must be an object with 'role' and 'content'")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """Split two whole conversations into (shared prompt ending with a user turn, chosen tail, rejected tail)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared - 1]["role"] != "user":
        shared -= 1
    if shared == 0:
        raise RowError("chosen", "chosen and rejected share no prompt ending with a user turn")
    return chosen[:shared], chosen[shared:], rejected[shared:]


# ---------------------------------------------------------------------------------------------------------------
# LMFlow dialogue text (the one parser; rlhfkit.mixtures.lmflow writes files with the same tags)
# ---------------------------------------------------------------------------------------------------------------
LMFLOW_ROLE_TAGS = {"system": "###System:", "user": "###Human:", "assistant": "###Assistant:"}
_LMFLOW_TAG_ROLES = {tag: role for role, tag in LMFLOW_ROLE_TAGS.items()}
LMFLOW_TAG = re.compile("(" + "|".join(re.escape(tag) for tag in LMFLOW_ROLE_TAGS.values()) + ")")


def parse_lmflow_text(text: str, field_name: str = "text") -> list[dict]:
    """Messages of an LMFlow dialogue "###Human: <user>###Assistant: <assistant>…" (optionally "###System: …" first).

    Exact: a message's content is the text after its tag minus exactly one space, so writing "<tag> " + content
    (`rlhfkit.mixtures.lmflow.render_text`) and parsing it back gives the same messages, whitespace included."""
    if not isinstance(text, str):
        raise RowError(field_name, f"expected an LMFlow dialogue string, got {type(text).__name__}")
    pieces = LMFLOW_TAG.split(text)
    if pieces[0].strip():
        raise RowError(field_name, "text before the first '###Human:' tag; not an LMFlow dialogue")
    messages = [{"role": _LMFLOW_TAG_ROLES[tag], "content": body[1:] if body.startswith(" ") else body}
                for tag, body in zip(pieces[1::2], pieces[2::2])]
    if not messages:
        raise RowError(field_name, "no '###Human:'/'###Assistant:' turns found")
    return messages


# ---------------------------------------------------------------------------------------------------------------
# the preference formats: one row each (detect + convert); "valid prompt" and "is a preference row" live here
# ---------------------------------------------------------------------------------------------------------------
def _whole_dialogues(parse):
    """`pair` for formats whose chosen/rejected are whole conversations: split them at the shared prompt."""
    def pair(row: dict, fmt: "PreferenceFormat") -> tuple[list, list, list]:
        return split_shared_prompt(parse(row, fmt.chosen_field), parse(row, fmt.rejected_field))
    return pair


def _hh_side(row: dict, name: str) -> list[dict]:
    if not isinstance(row[name], str):
        raise RowError(name, "expected a dialogue string like 'chosen'")
    return parse_hh_dialogue(row[name], name)


def _messages_side(row: dict, name: str) -> list[dict]:
    return as_messages(row[name], name, "assistant")


def _explicit_side(row: dict, name: str) -> list[dict]:
    prompt, reply = _explicit_split(row, name)
    return reply if reply[: len(prompt)] == prompt and len(reply) > len(prompt) else prompt + reply


def _explicit_split(row: dict, name: str) -> tuple[list[dict], list[dict]]:
    prompt = as_messages(row["prompt"], "prompt", "user")
    return prompt, as_messages(row[name], name, "assistant")


def _explicit_pair(row: dict, fmt: "PreferenceFormat") -> tuple[list, list, list]:
    prompt, chosen = _explicit_split(row, "chosen")
    rejected = as_messages(row["rejected"], "rejected", "assistant")
    # TRL-style rows sometimes repeat the prompt inside chosen/rejected: strip it
    if chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt and len(chosen) > len(prompt):
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    return prompt, chosen, rejected


def _lmflow_side(row: dict, name: str) -> list[dict]:
    if not isinstance(row.get(name), str):
        raise RowError(name, "missing or not a string")
    return parse_lmflow_text(row[name], name)


def _lmflow_pair(row: dict, fmt: "PreferenceFormat") -> tuple[list, list, list]:
    """LMFlow's rule: each text is a dialogue ending in the reply after its last '###Human:' turn; the dialogues
    before the replies must be the same."""
    halves = []
    for name in ("positive", "negative"):
        messages = _lmflow_side(row, name)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None or last_user == len(messages) - 1:
            raise RowError(name, "the dialogue must end with an '###Assistant:' reply after a '###Human:' turn")
        halves.append((messages[: last_user + 1], messages[last_user + 1:]))
    (prompt, chosen), (negative_prompt, rejected) = halves
    if prompt != negative_prompt:
        raise RowError("negative", "its dialogue before the reply differs from 'positive'")
    return prompt, chosen, rejected


@dataclass(frozen=True)
class PreferenceFormat:
    """One input format of preference rows: how to recognise it, its two sides, how to convert it."""

    name: str
    description: str
    chosen_field: str
    rejected_field: str
    matches: Any  # (row) -> bool, by the chosen side's fields alone (SFT takes rows that have no rejected side)
    side: Any  # (row, field name) -> that side's whole conversation (prompt + reply), not yet validated
    pair: Any  # (row, format) -> (prompt, chosen, rejected) message lists, not yet validated


# first match wins: LMFlow's keys are its own; "prompt" makes a row explicit; a string chosen is an HH dialogue
PREFERENCE_FORMATS: tuple[PreferenceFormat, ...] = (
    PreferenceFormat("lmflow", 'LMFlow reward data {"positive", "negative"}: "###Human: …###Assistant: …" texts',
                     "positive", "negative", lambda row: "positive" in row, _lmflow_side, _lmflow_pair),
    PreferenceFormat("explicit", "prompt + chosen/rejected, each a string or a message list (TRL explicit prompt, "
                     "RewardBench rows `prompt, chosen, rejected, subset[, id]`)",
                     "chosen", "rejected", lambda row: "prompt" in row and "chosen" in row, _explicit_side,
                     _explicit_pair),
    PreferenceFormat("hh_text", 'chosen/rejected are raw "\\n\\nHuman: … \\n\\nAssistant: …" dialogues (Anthropic HH)',
                     "chosen", "rejected", lambda row: isinstance(row.get("chosen"), str), _hh_side,
                     _whole_dialogues(_hh_side)),
    PreferenceFormat("pair_messages", "chosen/rejected are whole conversations sharing a prompt (RLHFlow, TRL "
                     "implicit prompt)", "chosen", "rejected", lambda row: "chosen" in row, _messages_side,
                     _whole_dialogues(_messages_side)),
)
FORMATS_BY_NAME = {fmt.name: fmt for fmt in PREFERENCE_FORMATS}


def preference_format(row: dict, need_rejected: bool = True) -> PreferenceFormat | None:
    """The format of a row, or None; `need_rejected=False` also accepts a row with only its chosen side."""
    for fmt in PREFERENCE_FORMATS:
        if fmt.matches(row):
            return fmt if not need_rejected or fmt.rejected_field in row else None
    return None


def is_preference_row(row: Any) -> bool:
    """Whether a row is preference data in one of `PREFERENCE_FORMATS` (both sides present)."""
    return isinstance(row, dict) and preference_format(row) is not None


def detect_format(row: dict) -> str:
    """The name of a row's format; raises RowError naming the missing field."""
    fmt = preference_format(row, need_rejected=False)
    if fmt is not None and fmt.rejected_field in row:
        return fmt.name
    raise RowError(fmt.rejected_field if fmt is not None else "chosen",
                   f"missing (a preference row needs chosen/rejected, or LMFlow positive/negative; "
                   f"found fields {sorted(k for k in row if not str(k).startswith('_'))})")


def chosen_conversation(row: dict) -> tuple[str, list[dict]] | None:
    """(field, the chosen side's whole conversation) of a preference row, even one with no rejected side, or None
    when the row is in no preference format. The SFT loader trains on it. Raises RowError when it is malformed."""
    fmt = preference_format(row, need_rejected=False)
    return None if fmt is None else (fmt.chosen_field, fmt.side(row, fmt.chosen_field))


def validate_turns(messages: list[dict], field_name: str, kind: str, check_content: bool = True) -> None:
    """The canonical turn order (docs/internals.md): a prompt is an optional leading system message, then user and
    assistant alternating from user, ending with user; a response is assistant turns ending with one. Contents
    must be non-empty strings unless `check_content=False`. Raises RowError naming `field_name`."""
    if not messages:
        raise RowError(field_name, "is empty")
    expected = "user" if kind == "prompt" else "assistant"
    start = 1 if kind == "prompt" and messages[0]["role"] == "system" else 0
    if kind == "prompt" and start == 1 and len(messages) == 1:
        raise RowError(field_name, "has only a system message; the prompt must end with a user turn")
    for index, message in enumerate(messages):
        role, content = message["role"], message.get("content")
        if role not in ROLES:
            raise RowError(field_name, f"message {index} has unknown role '{role}' (use {', '.join(ROLES)})")
        if check_content and not isinstance(content, str):
            raise RowError(field_name, f"message {index} content must be a string, got {type(content).__name__}")
        if check_content and not content.strip():
            raise RowError(field_name, f"message {index} ({role}) has empty content")
        if index < start:
            continue
        if role != expected:
            raise RowError(field_name, f"message {index} is '{role}' where '{expected}' was expected (roles must alternate)")
        expected = "assistant" if expected == "user" else "user"
    last = messages[-1]["role"]
    if kind == "prompt" and last != "user":
        raise RowError(field_name, "must end with a user turn")
    if kind == "response" and last != "assistant":
        raise RowError(field_name, "must end with an assistant turn")


def is_valid_prompt(messages: list[dict]) -> bool:
    """Whether messages follow the prompt turn order of `validate_turns` (contents are not checked)."""
    try:
        validate_turns(list(messages), "prompt", "prompt", check_content=False)
    except RowError:
        return False
    return True


def to_canonical(row: dict, fmt: str | None = None) -> dict:
    """Convert one input row to the canonical schema (pure). Raises RowError naming the field at fault."""
    fmt = fmt or detect_format(row)
    if fmt not in FORMATS_BY_NAME:
        raise RowError("format", f"unknown format '{fmt}'")
    spec = FORMATS_BY_NAME[fmt]
    prompt, chosen, rejected = spec.pair(row, spec)
    validate_turns(prompt, "prompt", "prompt")
    validate_turns(chosen, spec.chosen_field, "response")
    validate_turns(rejected, spec.rejected_field, "response")
    out: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if row.get("margin") is not None:
        margin = row["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
            raise RowError("margin", f"must be a number, got {margin!r}")
        out["margin"] = float(margin)
    for key in ("source", "subset", "id"):
        if row.get(key) is not None:
            out[key] = str(row[key])
    return out


# ---------------------------------------------------------------------------------------------------------------
# loading several sources
# ---------------------------------------------------------------------------------------------------------------
def convert_records(path, records: list, convert, skip_invalid: bool, counts: Counter, hint_skip_flag: bool = True):
    """Yield (row number, record, convert(record)) for each row of a file, 1-based.

    A row that is not an object, or whose conversion raises RowError, stops loading with one line naming the file,
    row and field, unless `skip_invalid`: then it is skipped and counted in `counts` as `skipped_invalid_<field>`.
    `hint_skip_flag`: end the message with the `--skip_invalid_rows` hint (callers whose stages lack the flag don't).
    """
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise UserError(f"{where(path, number)}: a row must be an object, got {type(record).__name__}")
        try:
            converted = convert(record)
        except RowError as exc:
            if skip_invalid:
                counts[f"skipped_invalid_{exc.field}"] += 1
                continue
            hint = " (or pass --skip_invalid_rows true to skip and count such rows)" if hint_skip_flag else ""
            raise UserError(f"{where(path, number, exc.field)}: {exc.message}{hint}") from None
        yield number, record, converted


@dataclass
class SourceSpec:
    path: str
    count: int | None = None
    fraction: float | None = None

    @property
    def name(self) -> str:
        base = Path(self.path).name
        for suffix in DATA_SUFFIXES:
            if base.lower().endswith(suffix):
                return base[: -len(suffix)]
        return base


def parse_source(spec: str) -> SourceSpec:
    """`path`, `path:N` (first N after a seeded shuffle) or `path:0.25` (that fraction)."""
    match = re.fullmatch(r"(.+?):(\d+(?:\.\d+)?)", spec)
    if not match or os.path.exists(spec):
        return SourceSpec(spec)
    path, amount = match.group(1), match.group(2)
    if "." in amount:
        fraction = float(amount)
        if not 0 < fraction <= 1:
            raise UserError(f"{spec}: a fraction must be in (0, 1]")
        return SourceSpec(path, fraction=fraction)
    return SourceSpec(path, count=int(amount))


@dataclass
class PreferenceData:
    rows: list[dict]
    report: dict[str, dict] = field(default_factory=dict)  # per source: read, kept, dropped_*, skipped_*

    def totals(self) -> dict[str, int]:
        total: Counter = Counter()
        for counts in self.report.values():
            total.update(counts)
        return dict(total)

    def log(self, title: str = "preference data") -> None:
        for source, counts in self.report.items():
            details = ", ".join(f"{key}={value}" for key, value in counts.items() if key not in ("read", "kept"))
            logger.info("%s: %s: read %d, kept %d%s", title, source, counts.get("read", 0), counts.get("kept", 0),
                        f" ({details})" if details else "")


def load_preferences(
    sources: list[str] | str,
    seed: int = 42,
    skip_invalid: bool = False,
    split: str = "train",
) -> PreferenceData:
    """Load and convert one or more sources (see `parse_source`) into canonical rows.

    Rows without a `source` field get the source's file stem, so multi-source objectives (MORE) can group them.
    """
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise UserError("no dataset given (--dataset_path)")
    rows: list[dict] = []
    report: dict[str, dict] = {}
    for spec_text in sources:
        spec = parse_source(spec_text)
        records = read_records(spec.path, split=split, skip_invalid=skip_invalid)
        counts: Counter = Counter(read=len(records) + sum(records.skipped.values()), **records.skipped)
        converted = []
        for _, _, row in convert_records(spec.path, records, to_canonical, skip_invalid, counts):
            if row["chosen"] == row["rejected"]:
                counts["dropped_identical"] += 1
                continue
            row.setdefault("source", spec.name)
            converted.append(row)
        if spec.count is not None or spec.fraction is not None:
            want = spec.count if spec.count is not None else round(spec.fraction * len(converted))
            if want > len(converted):
                logger.warning("%s: asked for %d rows, only %d available", spec.path, want, len(converted))
            order = list(range(len(converted)))
            random.Random(seed).shuffle(order)
            keep = sorted(order[: min(want, len(converted))])
            counts["dropped_sampling"] += len(converted) - len(keep)
            converted = [converted[i] for i in keep]
        counts["kept"] = len(converted)
        report[spec_text] = dict(counts)
        rows.extend(converted)
    data = PreferenceData(rows, report)
    data.log()
    return data


def train_eval_split(rows: list[dict], percentage: float, seed: int = 42) -> tuple[list[dict], list[dict]]:
    """Hold out `percentage` % of rows (LMFlow's --validation_split_percentage), seeded."""
    if not 0 <= percentage < 100:
        raise UserError("--validation_split_percentage must be in [0, 100)")
    if percentage == 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * percentage / 100))
    eval_index = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in eval_index], [r for i, r in enumerate(rows) if i in eval_index]


def load_train_eval(args, seed: int = 42) -> tuple[PreferenceData, list[dict], list[dict]]:
    """Training and held-out rows from `rlhfkit.args.DataArguments`: a separate eval set, or a seeded
    `--validation_split_percentage` of the training data. Returns (the training data with its report, train, eval)."""
    data = load_preferences(args.dataset_path, seed=seed, skip_invalid=args.skip_invalid_rows, split=args.dataset_split)
    if args.eval_dataset_path:
        eval_data = load_preferences(args.eval_dataset_path, seed=seed, skip_invalid=args.skip_invalid_rows,
                                     split=args.dataset_split)
        train_rows, eval_rows = data.rows, eval_data.rows
    else:
        train_rows, eval_rows = train_eval_split(data.rows, args.validation_split_percentage, seed)
    if not train_rows:
        raise UserError(f"{args.dataset_path[0]}: no usable training pairs")
    return data, train_rows, eval_rows
