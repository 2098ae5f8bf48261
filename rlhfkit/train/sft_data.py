"""SFT data: every supported input format turned into the rows TRL's `SFTTrainer` takes.

Output rows are one of two kinds, the same kind for the whole dataset (TRL decides the format from the first row):

- `{"messages": [...]}`: chat data, rendered with the tokenizer's chat template; the loss can be restricted to
  assistant tokens (TRL's `assistant_only_loss`, driven by `{% generation %}` markers in the template).
- `{"text": "..."}` (plain language modelling, loss on every token) or `{"prompt": str, "completion": str}`
  (from `--text_template`: loss on the completion only when assistant-only loss is on).

Input formats, detected per row (one run may not mix chat, plain-text and template rows):

| input                                                        | becomes                                      |
|--------------------------------------------------------------|----------------------------------------------|
| `{"messages": [{"role","content"}...]}` (ours, annotate/)    | messages                                     |
| `{"conversations": [{"from","value"}...]}` (ShareGPT)        | messages (human→user, gpt→assistant)         |
| `{"prompt": msgs or str, "completion": msgs or str}`         | messages (a string prompt becomes one user turn) |
| a preference row, any `rlhfkit.data.PREFERENCE_FORMATS` format (no rejected side needed) | messages of the chosen dialogue |
| `{"text": str}`                                              | text                                         |
| LMFlow file `{"type": "text_only", "instances": [{"text"}]}` | text                                         |
| LMFlow file `{"type": "text2text", "instances": [{"input","output"}]}` | messages (user/assistant)          |
| LMFlow file `{"type": "conversation", "instances": [{"messages"}]}` | messages                              |
| any row + `--text_template "Question: {question}\\n\\nAnswer: {response}"` | prompt/completion split at the last field |

Preference formats: canonical `prompt`+`chosen`, HH-RLHF raw `chosen`, RLHFlow conversations, LMFlow `positive`.

String prompt/completion pairs become chat turns rather than raw text because every later stage (DPO, generation,
PPO) renders prompts through the chat template; training SFT on another format would teach the model a layout it
never sees again. Use `--text_template` to train on raw text layouts.

Malformed rows (wrong types, missing fields, unknown roles) raise a one-line `UserError` naming the file, row and
field (or, with `skip_invalid=True`, are skipped and counted as "invalid"). Rows that are well-formed but carry nothing to learn (empty text, a conversation with no assistant reply, an
HH dialogue ending on a Human turn) are dropped and counted by reason in `SFTData.report`.
"""

from __future__ import annotations

import logging
import os
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.data import RowError, chosen_conversation
from rlhfkit.errors import UserError, where

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function": "tool"}


@dataclass
class SFTData:
    rows: list[dict[str, Any]]
    kind: str  # "messages" | "text" | "prompt_completion"
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# per-row converters (pure): return a row, or a string naming why the row is dropped
# ---------------------------------------------------------------------------------------------------------------
def _check_messages(messages: Any, loc: str, allow_empty_content: bool = False) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{loc}: must be a non-empty list of messages")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{loc}: message {index} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UserError(f"{loc}: message {index}: role '{role}' is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"{loc}: message {index}: 'content' must be a string")
        out.append({"role": role, "content": content})
    return out


def _sharegpt(turns: Any, loc: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{loc}: must be a non-empty list of turns")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise UserError(f"{loc}: turn {index} must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise UserError(f"{loc}: turn {index}: speaker '{turn['from']}' is not one of {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(turn["value"], str):
            raise UserError(f"{loc}: turn {index}: 'value' must be a string")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _as_turns(value: Any, role: str, loc: str) -> list[dict]:
    """A prompt or completion given as a message list or as one string."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _check_messages(value, loc)


def _conversation_problem(messages: list[dict]) -> str | None:
    """Why a conversation has nothing to train on, or None."""
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no assistant reply"
    return None


def _lmflow(row: dict, path: str, index: int) -> tuple[str, dict] | str:
    """An LMFlow instance (rlhfkit.files.read_records tags it with the file's `type`)."""
    kind = row["_lmflow_type"]
    if kind == "text_only":
        return convert_row({"text": row.get("text")}, path, index)
    if kind == "text2text":
        return convert_row({"prompt": row.get("input"), "completion": row.get("output")}, path, index)
    if kind == "conversation":
        return convert_row({"messages": row.get("messages")}, path, index)
    raise UserError(f"{path}: field 'type': LMFlow type '{kind}' is not SFT data (use text_only, text2text or conversation)")


def convert_row(row: Any, path: str, index: int) -> tuple[str, dict] | str:
    """One input row → `("messages"|"text", row)`, or the reason it is dropped. Raises UserError if malformed."""
    loc = where(path, index)
    if not isinstance(row, dict):
        raise UserError(f"{loc}: expected an object, got {type(row).__name__}")
    if row.get("_lmflow_type") is not None:
        return _lmflow(row, path, index)
    if "messages" in row:
        messages = _check_messages(row["messages"], where(path, index, "messages"))
        return _conversation_problem(messages) or ("messages", {"messages": messages})
    if "conversations" in row:
        messages = _sharegpt(row["conversations"], where(path, index, "conversations"))
        return _conversation_problem(messages) or ("messages", {"messages": messages})
    if "prompt" in row and "completion" in row:
        for name in ("prompt", "completion"):
            if row[name] is None:
                raise UserError(f"{where(path, index, name)}: is missing (null)")
        prompt = _as_turns(row["prompt"], "user", where(path, index, "prompt"))
        completion = _as_turns(row["completion"], "assistant", where(path, index, "completion"))
        if any(m["role"] != "assistant" for m in completion):
            raise UserError(f"{where(path, index, 'completion')}: must contain only assistant messages")
        messages = prompt + completion
        return _conversation_problem(messages) or ("messages", {"messages": messages})
    try:  # preference rows in any format rlhfkit.data knows (its rejected side may be absent): the chosen side
        chosen = chosen_conversation(row)
    except RowError as exc:
        raise UserError(f"{where(path, index, exc.field)}: {exc.message}") from None
    if chosen is not None:
        side, conversation = chosen
        messages = _check_messages(conversation, where(path, index, side))
        if messages[-1]["role"] != "assistant":
            return "chosen dialogue does not end with an assistant turn"
        return _conversation_problem(messages) or ("messages", {"messages": messages})
    if "text" in row:
        text = row["text"]
        if not isinstance(text, str):
            raise UserError(f"{where(path, index, 'text')}: must be a string")
        return ("text", {"text": text}) if text.strip() else "empty text"
    raise UserError(
        f"{loc}: no SFT fields found (expected 'messages', 'conversations', 'prompt'+'completion', a preference "
        f"row's chosen side, or 'text'; or pass --text_template); keys: {sorted(row)[:8]}"
    )


# ---------------------------------------------------------------------------------------------------------------
# --text_template
# ---------------------------------------------------------------------------------------------------------------
def unescape_template(template: str) -> str:
    """Turn the two-character sequences `\\n` and `\\t` typed on a shell command line into real newlines/tabs."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


@dataclass(frozen=True)
class TextTemplate:
    """`Question: {question}\\n\\nAnswer: {response}`: the text before the last field is the prompt, the last field
    (with the spaces before it) and what follows it the completion (so the loss can skip the question)."""

    prompt_part: str
    completion_part: str
    fields: tuple[str, ...]

    @classmethod
    def parse(cls, template: str) -> "TextTemplate":
        template = unescape_template(template)
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise UserError(f"--text_template: {exc} (write a literal brace as '{{{{' or '}}}}')") from None
        fields = [name for _, name, _, _ in parsed if name is not None]
        if not fields:
            raise UserError("--text_template: names no field, e.g. 'Question: {question}\\n\\nAnswer: {response}'")
        if any(not name or not name.isidentifier() for name in fields):
            raise UserError("--text_template: fields must be named, like {question}; positional {} is not allowed")
        cut = template.rindex("{" + fields[-1])
        # Spaces before the answer go with the answer: BPE vocabularies hold " word" as one token, so a prompt ending
        # in a space would tokenise differently alone than followed by the answer, and the boundary token would be
        # dropped from training (TRL warns "tokenized prompt is not a prefix").
        prompt_part = template[:cut].rstrip(" ")
        return cls(prompt_part, template[len(prompt_part):], tuple(dict.fromkeys(fields)))

    def apply(self, row: Any, path: str, index: int) -> dict | str:
        if not isinstance(row, dict):
            raise UserError(f"{where(path, index)}: expected an object, got {type(row).__name__}")
        values = {}
        for name in self.fields:
            if name not in row or row[name] is None:
                raise UserError(f"{where(path, index, name)}: missing (named in --text_template)")
            value = row[name]
            if not isinstance(value, (str, int, float)):
                raise UserError(f"{where(path, index, name)}: must be a string for --text_template")
            values[name] = value
        if not str(values[self.fields[-1]]).strip():
            return "empty response"
        try:
            prompt = self.prompt_part.format(**values)
            completion = self.completion_part.format(**values)
        except (ValueError, IndexError, KeyError) as exc:
            raise UserError(f"{where(path, index)}: --text_template cannot format this row ({exc})") from None
        return {"prompt": prompt, "completion": completion}


# ---------------------------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------------------------
def load_sft(paths: str | list[str], text_template: str | None = None, seed: int = 42, skip_invalid: bool = False,
             split: str = "train") -> SFTData:
    """Read and convert SFT data from one or more sources; see the module docstring for the formats.

    A source is `path`, `path:N` or `path:0.25` (first N rows / that fraction after a seeded shuffle), as for
    preference data (`rlhfkit.data.parse_source`). Rows are numbered from 1 in errors, like `rlhfkit.data`.
    """
    import random

    from rlhfkit.data import parse_source, read_records

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise UserError("--dataset_path: no SFT data file given")
    template = TextTemplate.parse(text_template) if text_template else None
    rows: list[dict] = []
    kinds: dict[str, str] = {}  # kind → first file that produced it, for the mixing error
    dropped: Counter[str] = Counter()
    per_file: dict[str, dict[str, int]] = {}
    for spec_text in map(str, paths):
        spec = parse_source(spec_text)
        path = spec.path
        records = read_records(path, split=split, skip_invalid=skip_invalid)
        if records.skipped:  # lines the reader could not decode, skipped under skip_invalid
            dropped["invalid"] += sum(records.skipped.values())
        numbered = list(enumerate(records, start=1))
        if spec.count is not None or spec.fraction is not None:
            want = spec.count if spec.count is not None else round(spec.fraction * len(numbered))
            random.Random(seed).shuffle(numbered)
            numbered = sorted(numbered[:want], key=lambda item: item[0])
        kept_here = 0
        for index, record in numbered:
            try:
                if template is not None:
                    converted = template.apply(record, path, index)
                    result = converted if isinstance(converted, str) else ("prompt_completion", converted)
                else:
                    result = convert_row(record, path, index)
            except UserError:
                if not skip_invalid:
                    raise
                result = "invalid"
            if isinstance(result, str):
                dropped[result] += 1
                continue
            kind, row = result
            if kinds and kind not in kinds:
                other, first_file = next(iter(kinds.items()))
                raise UserError(
                    f"{where(path, index)}: a {_KIND_NAMES[kind]} row in data that so far held {_KIND_NAMES[other]} "
                    f"rows (from {first_file}); one run trains on one kind (split the files or convert them)"
                )
            kinds.setdefault(kind, path)
            rows.append(row)
            kept_here += 1
        per_file[spec_text] = {"read": len(records), "kept": kept_here}
    if not rows:
        reasons = ", ".join(f"{n} {why}" for why, n in dropped.items()) or "the files are empty"
        raise UserError(f"{', '.join(map(str, paths))}: no usable SFT rows ({reasons})")
    kind = next(iter(kinds))
    report = {
        "kind": kind,
        "rows": len(rows),
        "dropped": dict(dropped),
        "files": per_file,
    }
    if dropped:
        logger.warning("SFT data: dropped %d rows (%s)", sum(dropped.values()),
                       ", ".join(f"{why}: {n}" for why, n in dropped.items()))
    logger.info("SFT data: %d %s rows from %d file(s)", len(rows), _KIND_NAMES[kind], len(per_file))
    return SFTData(rows=rows, kind=kind, report=report)


_KIND_NAMES = {"messages": "chat", "text": "plain-text", "prompt_completion": "--text_template"}


# ---------------------------------------------------------------------------------------------------------------
# assistant-only loss without {% generation %} markers: incremental rendering
# ---------------------------------------------------------------------------------------------------------------
NOT_INCREMENTAL = (
    "--assistant_only_loss: the chat template has no {{% generation %}} markers, TRL cannot patch it, and it does not "
    "render conversations incrementally ({why}); pass a --chat_template that wraps assistant content in "
    "{{% generation %}}…{{% endgeneration %}}, or --assistant_only_loss false"
)


def _common_prefix_length(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def assistant_token_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation under its chat template, and a 0/1 mask of the tokens its assistant turns add.

    For templates without `{% generation %}` markers (the open-instruct approach): assistant turn i is the tokens
    between the rendering of `messages[:i]` with the generation prompt and the rendering of `messages[:i+1]`. Each
    rendering must be a prefix of the whole conversation's tokens, checked token by token, except that its last token
    may differ if its text starts the rest of the conversation (BPE merged it across the boundary, e.g. a generation
    prompt ending in a space). A turn's trailing whitespace
    after its end-of-turn special token (ChatML's "\\n" after <|im_end|>) is layout, left out as markers leave it out.
    Raises ValueError naming what is wrong when the template does not render incrementally.
    """
    from rlhfkit.tokenization import render_ids

    full = render_ids(tokenizer, messages)
    mask = [0] * len(full)
    special = set(tokenizer.all_special_ids)

    def boundary(part: list[int], what: str) -> int:
        shared = _common_prefix_length(part, full)
        merged = shared == len(part) - 1 and tokenizer.decode(full[shared:]).startswith(tokenizer.decode(part[shared:]))
        if shared < len(part) and not merged:
            raise ValueError(f"the rendering up to {what} is not a prefix of the whole conversation's tokens "
                             f"(they differ at token {shared})")
        return shared

    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = render_ids(tokenizer, messages[:index], add_generation_prompt=True) if index else []
            after = render_ids(tokenizer, messages[: index + 1])
        except Exception as exc:  # jinja's TemplateError and whatever a template raises for a partial conversation
            raise ValueError(f"rendering the turns before message {index} fails: {exc}") from None
        start = boundary(before, f"the generation prompt of message {index}")
        end = boundary(after, f"message {index}")
        cut = end
        while cut > start and full[cut - 1] not in special and not tokenizer.decode([full[cut - 1]]).strip():
            cut -= 1
        if cut < end and cut > start and full[cut - 1] in special:
            end = cut
        if end <= start:
            raise ValueError(f"assistant message {index} adds no tokens")
        mask[start:end] = [1] * (end - start)
    return full, mask


def tokenize_assistant_only(rows: list[dict], tokenizer) -> list[dict]:
    """Chat rows → `{"input_ids", "assistant_masks"}` rows by `assistant_token_mask`; TRL's `SFTTrainer` takes these
    as already tokenised and builds its labels from `assistant_masks`. Raises the one-line UserError when the
    template does not render incrementally."""
    out = []
    for number, row in enumerate(rows, start=1):
        try:
            ids, mask = assistant_token_mask(tokenizer, row["messages"])
        except ValueError as exc:
            raise UserError(NOT_INCREMENTAL.format(why=f"conversation {number}: {exc}")) from None
        out.append({"input_ids": ids, "assistant_masks": mask})
    return out
