"""The process reward model (PRM): a causal LM that scores each reasoning step of a response.

Data (one canonical row: `{"prompt": [messages], "steps": [str], "labels": [bool]}`), read from the layouts as they
are published (detected per row; every bad row is one line naming file, row and field):
- stepwise (TRL's `trl-lib/math_shepherd`, `trl-lib/prm800k`): `{"prompt": str | messages, "completions": [str],
  "labels": [bool | 0/1]}`;
- Math-Shepherd (`peiyi9979/Math-Shepherd`): `{"input", "label", "task"}`: `input` is the question and the steps,
  each step ending in the tag "ки"; `label` is the same text with "+" or "-" in place of each tag. Converted as TRL's
  examples/datasets/math_shepherd.py @ 87421be4 does (the question is the text before "Step 1:" / "step 1:" / the
  first "?"; its list of rows whose first label sits inside the question is not reproduced: those rows are refused,
  naming the field, because their label count does not match their steps);
- PRM800K (`openai/prm800k` phase1/phase2 JSONL): `{"question": {"problem"}, "label": {"steps": [{"completions":
  [{"text", "rating"}], "chosen_completion", "human_completion"}]}}`: each row expands into several stepwise rows
  as TRL's examples/datasets/prm800k.py @ 9057793f does (every unchosen completion ends a row; the chosen path is the
  last row; a step counts as correct iff rating == 1, a human completion is correct).

Model (as RLHFlow math-rm and TRL's PRMTrainer): the prompt is rendered with the PRM's chat template up to the
generation prompt, then the steps follow as plain text, each followed by the step separator (TRL: `prompt +
step_k + separator` for every step, `step_separator` default "\\n", trl/experimental/prm/prm_trainer.py @ 42a973a2).
The score of step k is read at the last token of its separator: P(+) = softmax over the logits of the two label
tokens ("+", "-") there, as RLHFlow's math-rm/prm_evaluate.py @ 5b2a281c reads its "+"/"-" logits. Training is the
language-model loss of the label token at those positions only (RLHFlow: SFT on the "+"/"-" turns). What differs
from RLHFlow: they render every step as a user turn answered by an assistant "+" turn, so a forward scores all
steps only with "+" written after each earlier step; we score all steps of a response in one forward of its own
text (TRL's layout), so no earlier label is ever assumed. A step's text may not contain the separator (it would
be two steps).

Aggregates of a response's step scores (`AGGREGATES`): min, last, prod (Lightman et al.'s product, in log space for
RL), mean (what RLHFlow's prm_evaluate.py selects by: `sum(step_scores)/len(step_scores)`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from itertools import chain

import torch

from .errors import UserError, where

RUN_INFO_KEY = "process_reward_model"
AGGREGATES = ("min", "last", "prod", "mean")
MATH_SHEPHERD_TAG = "ки"


@dataclass
class StepFormat:
    """How steps are laid out and labelled; saved in run_info.json (`process_reward_model`)."""

    step_separator: str = "\n"
    positive: str = "+"
    negative: str = "-"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict, where_: str = "run_info.json") -> "StepFormat":
        unknown = set(payload) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"{where_}: field '{RUN_INFO_KEY}': unknown keys {sorted(unknown)}")
        fmt = cls(**payload)
        if not fmt.step_separator:
            raise UserError(f"{where_}: field '{RUN_INFO_KEY}.step_separator': must not be empty")
        return fmt


# ---------------------------------------------------------------------------------------------------------------
# reading the published layouts
# ---------------------------------------------------------------------------------------------------------------
def _prompt_messages(value, loc: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{loc}: empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                  for m in value):
        if value[-1]["role"] != "user":
            raise UserError(f"{loc}: the last message must be the user's")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise UserError(f"{loc}: expected a string or a list of messages")


def _label(value, loc: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise UserError(f"{loc}: expected true/false or 0/1, got {value!r}")


def from_stepwise(record: dict, loc_row: str) -> list[dict]:
    prompt = _prompt_messages(record.get("prompt"), f"{loc_row}: field 'prompt'")
    steps, labels = record.get("completions"), record.get("labels")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise UserError(f"{loc_row}: field 'completions': expected a non-empty list of step strings")
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise UserError(f"{loc_row}: field 'labels': expected one label per step ({len(steps)}), got "
                        f"{len(labels) if isinstance(labels, list) else type(labels).__name__}")
    if any(not s.strip() for s in steps):
        raise UserError(f"{loc_row}: field 'completions': step {next(i for i, s in enumerate(steps) if not s.strip())} "
                        "is empty")
    return [{"prompt": prompt, "steps": list(steps),
             "labels": [_label(v, f"{loc_row}: field 'labels'") for v in labels]}]


def from_math_shepherd(record: dict, loc_row: str) -> list[dict]:
    """TRL's math_shepherd.py conversion (see the module docstring), with bad rows refused instead of asserted."""
    text, label = record.get("input"), record.get("label")
    if not isinstance(text, str) or not isinstance(label, str):
        raise UserError(f"{loc_row}: field 'input'/'label': Math-Shepherd rows hold two strings")
    inputs = text.replace(MATH_SHEPHERD_TAG, "ⶻ")  # one character, so indexes match the label string
    if len(inputs) != len(label):
        raise UserError(f"{loc_row}: field 'label': not the 'input' text with +/- in place of each '{MATH_SHEPHERD_TAG}'")
    indexes = [m.start() for m in re.finditer("ⶻ", inputs)]
    if not indexes:
        raise UserError(f"{loc_row}: field 'input': no step tag '{MATH_SHEPHERD_TAG}'")
    bad = next((i for i in indexes if label[i] not in "+-"), None)
    if bad is not None:
        raise UserError(f"{loc_row}: field 'label': character {bad} is {label[bad]!r}, expected '+' or '-' where "
                        f"'input' has '{MATH_SHEPHERD_TAG}'")
    labels = [label[i] == "+" for i in indexes]
    pieces = [inputs[i:j] for i, j in zip(chain([0], indexes), chain(indexes, [None]))][:-1]
    prompt, completions = pieces[0], [c[1:].strip() for c in pieces[1:]]
    for marker in ("Step 1:", "step 1:"):
        if marker in prompt:
            prompt, first = prompt.split(marker, 1)
            completions = [(marker + first).strip()] + completions
            break
    else:
        if "?" not in prompt:
            raise UserError(f"{loc_row}: field 'input': cannot find where the question ends (no 'Step 1:' or '?')")
        prompt, first = prompt.split("?", 1)
        prompt += "?"
        completions = [first.strip()] + completions
    prompt = prompt.strip()
    if len(completions) != len(labels) or any(not c for c in completions):
        raise UserError(f"{loc_row}: field 'input': {len(completions)} steps for {len(labels)} labels (a label "
                        "inside the question, or an empty step)")
    return [{"prompt": [{"role": "user", "content": prompt}], "steps": completions, "labels": labels}]


def from_prm800k(record: dict, loc_row: str) -> list[dict]:
    """TRL's prm800k.py expansion (see the module docstring)."""
    question, label = record.get("question"), record.get("label")
    if not isinstance(question, dict) or not isinstance(question.get("problem"), str):
        raise UserError(f"{loc_row}: field 'question.problem': missing or not a string")
    if not isinstance(label, dict) or not isinstance(label.get("steps"), list):
        raise UserError(f"{loc_row}: field 'label.steps': missing or not a list")
    prompt = [{"role": "user", "content": question["problem"]}]
    out, done, done_labels = [], [], []
    for number, step in enumerate(label["steps"]):
        loc = f"{loc_row}: field 'label.steps[{number}]'"
        if not isinstance(step, dict):
            raise UserError(f"{loc}: not an object")
        completions, chosen, human = step.get("completions"), step.get("chosen_completion"), step.get("human_completion")
        if completions is None and human is None and chosen is None:
            break
        for index, completion in enumerate(completions or []):
            if not isinstance(completion, dict) or not isinstance(completion.get("text"), str):
                raise UserError(f"{loc}.completions[{index}]: needs a 'text' string")
            if index != chosen:
                out.append({"prompt": prompt, "steps": done + [completion["text"]],
                            "labels": done_labels + [completion.get("rating") == 1]})
        if chosen is not None:
            if not isinstance(chosen, int) or not 0 <= chosen < len(completions or []):
                raise UserError(f"{loc}.chosen_completion: {chosen!r} is not an index of its completions")
            picked, correct = completions[chosen], completions[chosen].get("rating") == 1
        elif human is not None:
            if not isinstance(human, dict) or not isinstance(human.get("text"), str):
                raise UserError(f"{loc}.human_completion: needs a 'text' string")
            picked, correct = human, True
        else:
            break
        done, done_labels = done + [picked["text"]], done_labels + [correct]
    if done:
        out.append({"prompt": prompt, "steps": done, "labels": done_labels})
    out = [row for row in out if all(s.strip() for s in row["steps"])]
    return out


STEP_FORMATS = {  # name → (detect(record), convert(record, loc) -> canonical rows)
    "stepwise": (lambda r: "completions" in r and "labels" in r, from_stepwise),
    "math_shepherd": (lambda r: "input" in r and "label" in r and isinstance(r.get("label"), str), from_math_shepherd),
    "prm800k": (lambda r: isinstance(r.get("question"), dict) and isinstance(r.get("label"), dict), from_prm800k),
}


def convert_record(record, loc_row: str) -> tuple[str, list[dict]]:
    if not isinstance(record, dict):
        raise UserError(f"{loc_row}: a row must be a JSON object")
    for name, (detect, convert) in STEP_FORMATS.items():
        if detect(record):
            return name, convert(record, loc_row)
    raise UserError(f"{loc_row}: not a step-labelled row (stepwise: prompt, completions, labels; Math-Shepherd: "
                    "input, label; PRM800K: question, label.steps)")


def load_step_rows(paths: list[str], split: str = "train", skip_invalid: bool = False) -> tuple[list[dict], dict]:
    """Canonical step rows from every file, and a report (rows read per format, rows expanded, skipped)."""
    from .files import read_records

    rows, report = [], {"formats": {}, "records": 0, "rows": 0, "skipped": 0}
    for path in paths:
        records = read_records(path, split=split, skip_invalid=skip_invalid)
        report["skipped"] += sum(records.skipped.values()) if hasattr(records, "skipped") else 0
        for number, record in enumerate(records, start=1):
            try:
                name, converted = convert_record(record, where(path, number))
            except UserError:
                if not skip_invalid:
                    raise
                report["skipped"] += 1
                continue
            report["formats"][name] = report["formats"].get(name, 0) + 1
            report["records"] += 1
            rows.extend(converted)
    report["rows"] = len(rows)
    if not rows:
        raise UserError(f"{', '.join(paths)}: no step-labelled rows")
    return rows, report


# ---------------------------------------------------------------------------------------------------------------
# tokenisation: prompt (chat template, generation prompt) + step_1 + sep + step_2 + sep …
# ---------------------------------------------------------------------------------------------------------------
def label_token_ids(tokenizer, fmt: StepFormat) -> list[int]:
    ids = []
    for label in (fmt.positive, fmt.negative):
        encoded = tokenizer.encode(label, add_special_tokens=False)
        if len(encoded) != 1:
            raise UserError(f"process-reward label {label!r} is {len(encoded)} tokens under this tokenizer; it must "
                            "be exactly one")
        ids.append(encoded[0])
    return ids


def step_sequence(tokenizer, fmt: StepFormat, prompt: list[dict], steps: list[str]) -> tuple[list[int], list[int]]:
    """(token ids, the index of each step's last token: the last token of the separator that ends it).

    Each step is tokenised on its own (with its separator) and appended, as TRL's PRMTrainer tokenises each
    completion and its separator separately; the positions are exact by construction."""
    from .tokenization import render_ids

    for k, step in enumerate(steps):
        if fmt.step_separator in step:
            raise UserError(f"step {k} contains the step separator {fmt.step_separator!r}; split it into steps")
    ids = render_ids(tokenizer, prompt, add_generation_prompt=True)
    ends = []
    separator = tokenizer.encode(fmt.step_separator, add_special_tokens=False)
    for step in steps:
        ids = ids + tokenizer.encode(step, add_special_tokens=False) + separator
        ends.append(len(ids) - 1)
    return ids, ends


def training_examples(rows: list[dict], tokenizer, fmt: StepFormat, max_length: int | None):
    """Each row as one sequence with a "+"/"-" target at every step end; steps beyond `max_length` are cut (their
    labels dropped, counted), as TRL truncates the completion; a row whose first step does not fit is dropped."""
    positive, negative = label_token_ids(tokenizer, fmt)
    records, counts = [], {"rows": len(rows), "steps": 0, "steps_cut": 0, "dropped_too_long": 0}
    for row in rows:
        ids, ends = step_sequence(tokenizer, fmt, row["prompt"], row["steps"])
        keep = len(ends) if max_length is None else sum(end < max_length for end in ends)
        counts["steps_cut"] += len(ends) - keep
        if keep == 0:
            counts["dropped_too_long"] += 1
            continue
        ids = ids[: ends[keep - 1] + 1]
        counts["steps"] += keep
        records.append({"sequences": [ids], "positions": [ends[:keep]],
                        "targets": [[positive if ok else negative for ok in row["labels"][:keep]]]})
    counts["kept"] = len(records)
    return records, counts


# ---------------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------------
def aggregate(step_scores: list[float], how: str) -> float:
    """One score from a response's step scores P(+)_k: min | last | prod | mean."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, not {how!r}")
    if not step_scores:
        raise ValueError("no steps to aggregate")
    if how == "min":
        return min(step_scores)
    if how == "last":
        return step_scores[-1]
    if how == "prod":
        return math.prod(step_scores)
    return sum(step_scores) / len(step_scores)


def split_steps(text: str, fmt: StepFormat) -> list[tuple[str, int]]:
    """A response's steps as (step text stripped, end offset in `text` of its last non-space character + 1):
    the text split at every separator; empty pieces (consecutive or trailing separators, blank lines) are not
    steps. The rule PPO uses to find where each step ends in the policy's own tokens."""
    out, start = [], 0
    for piece in text.split(fmt.step_separator):
        stripped = piece.strip()
        if stripped:
            end = start + len(piece.rstrip())
            out.append((stripped, end))
        start += len(piece) + len(fmt.step_separator)
    return out


@torch.no_grad()
def step_scores(model, tokenizer, fmt: StepFormat, items: list[tuple[list[dict], list[str]]], batch_size: int = 8,
                layout: str = "auto", max_length: int | None = None) -> list[list[float]]:
    """P(+) at every step of each (prompt, steps), one forward per response (packed, no padding). Steps beyond
    `max_length` tokens are not scored (fewer scores than steps: the caller decides)."""
    from .layout_check import choose_layout
    from .pairwise import flat_positions, logits_at
    from .scoring import batched_plans

    ids = label_token_ids(tokenizer, fmt)
    sequences, ends = [], []
    for prompt, steps in items:
        seq, seq_ends = step_sequence(tokenizer, fmt, prompt, steps)
        if max_length is not None and len(seq) > max_length:
            seq_ends = [e for e in seq_ends if e < max_length]
            seq = seq[:max_length]
        sequences.append(seq)
        ends.append(seq_ends)
    kind = choose_layout(model, layout)
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in items]
    for index, plan_ in batched_plans(sequences, None, batch_size, kind, tokenizer.pad_token_id):
        flat = flat_positions(plan_, [sequences[i] for i in index], None, [ends[i] for i in index])
        plan_ = plan_.to(device)
        probs = torch.softmax(logits_at(model, plan_, flat.to(device), ids), dim=-1)[:, 0].cpu().tolist()
        cursor = 0
        for i in index:
            out[i] = probs[cursor: cursor + len(ends[i])]
            cursor += len(ends[i])
    return out


# ---------------------------------------------------------------------------------------------------------------
# a PRM checkpoint
# ---------------------------------------------------------------------------------------------------------------
def read_step_format(path: str) -> StepFormat | None:
    from .checkpoints import read_run_info

    payload = (read_run_info(path) or {}).get(RUN_INFO_KEY)
    return None if payload is None else StepFormat.from_dict(payload, f"{path}/run_info.json")


def is_process_reward_model(path: str) -> bool:
    import os

    return os.path.isdir(path) and read_step_format(path) is not None


class ProcessRewardScorer:
    """A PRM checkpoint: `steps(prompts, responses)` → per-response step scores (responses split by `split_steps`),
    `__call__(prompts, responses)` → the `aggregate` of each (the labeler interface; a response without a step
    scores 0)."""

    name = "process-reward-model"

    def __init__(self, path: str, batch_size: int = 8, max_length: int | None = None, device=None, *,
                 aggregate: str = "min", dtype=None):
        from .models import load_label_token_checkpoint

        if aggregate not in AGGREGATES:
            raise UserError(f"--aggregate must be one of {', '.join(AGGREGATES)}, not '{aggregate}'")
        fmt, self.tokenizer, self.model = load_label_token_checkpoint(
            path, "process reward model", read_step_format, RUN_INFO_KEY, "prm_train.py", dtype, device)
        self.path, self.format, self.how = path, fmt, aggregate
        self.batch_size, self.max_length = batch_size, max_length
        label_token_ids(self.tokenizer, fmt)
        self.info = {"labeler": path, "kind": "process_reward_model", "aggregate": aggregate, "format": fmt.to_dict()}

    def score_steps(self, items: list[tuple[list[dict], list[str]]]) -> list[list[float]]:
        return step_scores(self.model, self.tokenizer, self.format, items, self.batch_size,
                           max_length=self.max_length)

    def steps(self, prompts: list[list[dict]], responses: list[str]) -> list[list[float]]:
        items = [(p, [s for s, _ in split_steps(r, self.format)]) for p, r in zip(prompts, responses)]
        scored = [k for k, (_, steps) in enumerate(items) if steps]
        values = self.score_steps([items[k] for k in scored]) if scored else []
        out: list[list[float]] = [[] for _ in items]
        for k, v in zip(scored, values):
            out[k] = v
        return out

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        return [aggregate(s, self.how) if s else 0.0 for s in self.steps(prompts, responses)]
