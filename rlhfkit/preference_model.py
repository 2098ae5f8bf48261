"""The pairwise preference model (PM): a causal LM that reads a prompt and two responses and answers "A" or "B".

As RLHFlow's `pair-pm/` (RLHFlow/RLHF-Reward-Modeling; template and scoring read from
`pair-pm/process_pair_data.py` @ 5cd3fb5e, `pair-pm/README.md` @ 29d2ea01 and `useful_code/eval_reward_bench_pm.py`
@ 3c8fca00):
- the prompt's turns are rendered as plain text, `\\n` then per turn `\\n\\n<turn> user\\n {content}` (or
  `<turn> assistant`), then `\\n\\n\\n` (their `tokenizer_plain.chat_template`);
- the comparison is one user message, `[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \\n`,
  rendered with the PM's own chat template; the answer is one token, "A" or "B" (each must be a single token);
- P(A) = softmax over the two logits (logit_A, logit_B) at temperature 1, read where the answer is predicted;
- both orders are asked and P(first better) is their mean, 0.5·(P_A(a, b) + P_B(b, a)), so position bias cancels;
  a comparison is won when that mean is > 0.5 and tied at exactly 0.5 (their `correct = 0.5 if avg == 0.5`).
What differs, and why: we read the answer after the chat template's generation prompt (the position the "A"/"B"
token was trained at), where their evaluation script reads the end of the user turn without it; we tokenise once
with the template (their script strips the BOS text and re-encodes); a system message in the prompt becomes a
leading `<turn> system` turn (their data filter drops such rows). Training puts the loss on the answer token only,
cross-entropy over the whole vocabulary, as their axolotl SFT of the one-token assistant turn does, and trains every
pair in both orders (their data script draws one random order per pair).

Everything that scores with a PM goes through here and through the pairwise forward (`rlhfkit.pairwise`): the two
orders of a comparison, and all comparisons of a prompt in a tournament, are one group that shares its prefix
(template header + context + "[RESPONSE A] "), and the LM head runs only at each comparison's last token.

Tournaments rank K responses to one prompt (RLHFlow recommends a tournament for K > 2, pair-pm/README.md):
- `round_robin`: every pair once (both orders), a response's score = its wins + 0.5·ties (Copeland); K(K−1)/2
  comparisons;
- `knockout`: a bracket in the given order (0 v 1, 2 v 3, …; an odd one out advances unplayed), winners advance; a
  response's score = the rounds it won (the champion has the most); K−1 comparisons. A tie advances the earlier one.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass

import torch

from .errors import UserError

logger = logging.getLogger(__name__)

RLHFLOW_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \n"
TOURNAMENTS = ("round_robin", "knockout")
RUN_INFO_KEY = "preference_model"  # the run_info.json key that marks a PM checkpoint and holds its template


@dataclass
class PairTemplate:
    """How a comparison is put to the PM; saved in run_info.json (`preference_model`) and read back by every user."""

    template: str = RLHFLOW_TEMPLATE
    label_a: str = "A"
    label_b: str = "B"
    context: str = "rlhflow_turns"  # the plain `<turn> user` rendering above (the only one, named for run_info)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict, where: str = "run_info.json") -> "PairTemplate":
        unknown = set(payload) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"{where}: field '{RUN_INFO_KEY}': unknown keys {sorted(unknown)}")
        template = cls(**payload)
        for field_name in ("{context}", "{response_A}", "{response_B}"):
            if field_name not in template.template:
                raise UserError(f"{where}: field '{RUN_INFO_KEY}.template': has no {field_name}")
        if template.context != "rlhflow_turns":
            raise UserError(f"{where}: field '{RUN_INFO_KEY}.context': unknown context rendering "
                            f"'{template.context}'")
        return template


def render_context(messages: list[dict]) -> str:
    """The prompt's turns as RLHFlow's plain template renders them (roles by turn parity; a system turn first)."""
    out = "\n"
    turns = [m for m in messages if m["role"] != "system"]
    for message in messages:
        if message["role"] == "system":
            out += f"\n\n<turn> system\n {message['content']}"
    for index, message in enumerate(turns):
        role = "user" if index % 2 == 0 else "assistant"
        out += f"\n\n<turn> {role}\n {message['content']}"
    return out + "\n\n\n"


def label_token_ids(tokenizer, template: PairTemplate) -> list[int]:
    """[id of "A", id of "B"]: each label must be exactly one token of the PM's tokenizer."""
    ids = []
    for label in (template.label_a, template.label_b):
        encoded = tokenizer.encode(label, add_special_tokens=False)
        if len(encoded) != 1:
            raise UserError(f"preference-model label {label!r} is {len(encoded)} tokens under this tokenizer; "
                            "it must be exactly one")
        ids.append(encoded[0])
    if ids[0] == ids[1]:
        raise UserError("preference-model labels must be different tokens")
    return ids


def comparison_ids(tokenizer, template: PairTemplate, prompt: list[dict], response_a: str, response_b: str) -> list[int]:
    """Token ids of one comparison, ending where the answer token is predicted (after the generation prompt)."""
    from .tokenization import render_ids

    text = template.template.format(context=render_context(prompt), response_A=response_a, response_B=response_b)
    return render_ids(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)


def response_text(messages: list[dict]) -> str:
    """A response's text: the content of its assistant message(s), joined by a blank line when several."""
    return "\n\n".join(m["content"] for m in messages)


# ---------------------------------------------------------------------------------------------------------------
# training examples
# ---------------------------------------------------------------------------------------------------------------
def training_examples(rows: list[dict], tokenizer, template: PairTemplate, max_length: int | None):
    """Each preference pair as one group of two comparisons, (chosen, rejected) → "A" and (rejected, chosen) → "B".

    Returns (records, counts). A record: {"sequences": [ids_cr, ids_rc], "positions": [[len−1], [len−1]],
    "targets": [[id_A], [id_B]]}. Pairs whose longer order exceeds `max_length` are dropped and counted (the answer
    is read at the end, and cutting inside a response would change what is compared)."""
    id_a, id_b = label_token_ids(tokenizer, template)
    records, counts = [], {"pairs": len(rows), "dropped_too_long": 0}
    for row in rows:
        chosen, rejected = response_text(row["chosen"]), response_text(row["rejected"])
        forward = comparison_ids(tokenizer, template, row["prompt"], chosen, rejected)
        backward = comparison_ids(tokenizer, template, row["prompt"], rejected, chosen)
        if max_length is not None and max(len(forward), len(backward)) > max_length:
            counts["dropped_too_long"] += 1
            continue
        records.append({"sequences": [forward, backward], "positions": [[len(forward) - 1], [len(backward) - 1]],
                        "targets": [[id_a], [id_b]]})
    counts["kept"] = len(records)
    return records, counts


# ---------------------------------------------------------------------------------------------------------------
# scoring: P(a ≻ b), both orders, through the pairwise forward
# ---------------------------------------------------------------------------------------------------------------
def order_probabilities(logits_ab: torch.Tensor) -> torch.Tensor:
    """[M, 2] logits of ("A", "B") → [M] P("A") = softmax over the two (RLHFlow, temperature 1)."""
    return torch.softmax(logits_ab.float(), dim=-1)[:, 0]


def both_orders(p_a_forward: float, p_a_backward: float) -> float:
    """P(first ≻ second) from P("A") asked as (first, second) and as (second, first): their mean."""
    return 0.5 * (p_a_forward + (1.0 - p_a_backward))


def outcome(probability: float) -> float:
    """1 win, 0 loss, 0.5 tie (exactly 0.5), as RLHFlow's evaluation counts a comparison."""
    return 0.5 if probability == 0.5 else float(probability > 0.5)


def log_odds(probability: float, eps: float = 1e-6) -> float:
    p = min(max(probability, eps), 1.0 - eps)
    return math.log(p / (1.0 - p))


@torch.no_grad()
def win_probabilities(model, tokenizer, template: PairTemplate, comparisons: list[tuple[list[dict], str, str]],
                      batch_size: int = 8, max_length: int | None = None, layout: str = "auto",
                      progress: bool = False) -> tuple[list[float], dict]:
    """P(a ≻ b) for each (prompt, a, b), the mean over both orders; and counts (truncated sequences).

    All comparisons with the same prompt form one group in the pairwise forward (they share the template header and
    the context). A sequence longer than `max_length` keeps its last `max_length` tokens (the answer is read at the
    end; counted). `batch_size` is in sequences (two per comparison)."""
    from tqdm.auto import tqdm

    from .layout_check import choose_layout
    from .pairwise import logits_at
    from .scoring import batched_plans, groups_by_key

    if not comparisons:
        return [], {"truncated_sequences": 0}
    ids = label_token_ids(tokenizer, template)
    sequences, truncated = [], 0
    for prompt, a, b in comparisons:
        for first, second in ((a, b), (b, a)):
            seq = comparison_ids(tokenizer, template, prompt, first, second)
            if max_length is not None and len(seq) > max_length:
                seq, truncated = seq[-max_length:], truncated + 1
            sequences.append(seq)
    keys = [json.dumps(prompt, sort_keys=True) for prompt, _, _ in comparisons for _ in range(2)]
    groups = groups_by_key(keys)
    kind = choose_layout(model, layout)
    device = next(model.parameters()).device
    p_a = [0.0] * len(sequences)
    plans = list(batched_plans(sequences, groups, max(batch_size, 2), kind, tokenizer.pad_token_id))
    for index, plan_ in tqdm(plans, desc="preference model", disable=not progress):
        plan_ = plan_.to(device)
        values = order_probabilities(logits_at(model, plan_, plan_.last_index, ids)).cpu().tolist()
        for i, value in zip(index, values):
            p_a[i] = value
    probabilities = [both_orders(p_a[2 * k], p_a[2 * k + 1]) for k in range(len(comparisons))]
    return probabilities, {"truncated_sequences": truncated}


# ---------------------------------------------------------------------------------------------------------------
# tournaments
# ---------------------------------------------------------------------------------------------------------------
def round_robin_scores(k: int, probability: dict[tuple[int, int], float]) -> list[float]:
    """Copeland scores from P(i ≻ j) for every i < j: wins + 0.5·ties."""
    scores = [0.0] * k
    for (i, j), p in probability.items():
        result = outcome(p)
        scores[i] += result
        scores[j] += 1.0 - result
    return scores


def tournament_scores(compare, groups: list[tuple[list[dict], list[str]]], mode: str) -> list[list[float]]:
    """Scores of each group's responses (higher is better) from `compare(list of (prompt, a, b)) -> [P(a ≻ b)]`,
    which is called once per round with every group's comparisons of that round (one call for round robin)."""
    if mode not in TOURNAMENTS:
        raise ValueError(f"tournament must be one of {', '.join(TOURNAMENTS)}, not {mode!r}")
    if mode == "round_robin":
        asked = [(g, i, j) for g, (_, responses) in enumerate(groups)
                 for i in range(len(responses)) for j in range(i + 1, len(responses))]
        probabilities = compare([(groups[g][0], groups[g][1][i], groups[g][1][j]) for g, i, j in asked])
        per_group: list[dict] = [{} for _ in groups]
        for (g, i, j), p in zip(asked, probabilities):
            per_group[g][(i, j)] = p
        return [round_robin_scores(len(responses), per_group[g]) for g, (_, responses) in enumerate(groups)]
    scores = [[0.0] * len(responses) for _, responses in groups]
    alive = [list(range(len(responses))) for _, responses in groups]
    while any(len(a) > 1 for a in alive):
        asked = [(g, a[n], a[n + 1]) for g, a in enumerate(alive) for n in range(0, len(a) - 1, 2)]
        probabilities = compare([(groups[g][0], groups[g][1][i], groups[g][1][j]) for g, i, j in asked])
        winners: dict[int, list[int]] = {g: [] for g in range(len(groups))}
        for (g, i, j), p in zip(asked, probabilities):
            winner = i if p >= 0.5 else j  # a tie advances the earlier one
            scores[g][winner] += 1.0
            winners[g].append(winner)
        for g, a in enumerate(alive):
            if len(a) % 2 == 1 and len(a) > 1:
                winners[g].append(a[-1])  # the odd one out advances unplayed (a bye is not a win)
            if len(a) > 1:
                alive[g] = winners[g]
    return scores


# ---------------------------------------------------------------------------------------------------------------
# loading a PM checkpoint
# ---------------------------------------------------------------------------------------------------------------
def read_template(path: str) -> PairTemplate | None:
    """The checkpoint's PairTemplate if it is a PM (pm_train.py output), else None."""
    from .checkpoints import read_run_info

    run_info = read_run_info(path) or {}
    payload = run_info.get(RUN_INFO_KEY)
    if payload is None:
        return None
    return PairTemplate.from_dict(payload, where=f"{path}/run_info.json")


def is_preference_model(path: str) -> bool:
    import os

    return os.path.isdir(path) and read_template(path) is not None


class PreferenceModelScorer:
    """A PM checkpoint, ready to compare and rank: `compare(comparisons)`, `rank(groups, mode)`, and the labeler
    interface `__call__(prompts, responses)`, which ranks the responses that share a prompt by `tournament`
    (each group's responses get their tournament scores; a prompt with one response gets 0). All responses to the
    same prompt in one call are one tournament: two generation rows with the same prompt are ranked together
    (annotate/get_rewards.py never splits a row across calls)."""

    name = "preference-model"

    def __init__(self, path: str, batch_size: int = 16, max_length: int | None = None, device=None, *,
                 tournament: str = "round_robin", dtype=None):
        from .models import load_label_token_checkpoint

        if tournament not in TOURNAMENTS:
            raise UserError(f"--tournament must be one of {', '.join(TOURNAMENTS)}, not '{tournament}'")
        template, self.tokenizer, self.model = load_label_token_checkpoint(
            path, "pairwise preference model", read_template, RUN_INFO_KEY, "pm_train.py", dtype, device)
        self.path, self.template, self.tournament = path, template, tournament
        self.batch_size, self.max_length = batch_size, max_length
        label_token_ids(self.tokenizer, template)  # fail now, in one line, if a label is not one token
        self.counts = {"comparisons": 0, "truncated_sequences": 0}
        self.info = {"labeler": path, "kind": "preference_model", "tournament": tournament,
                     "template": template.to_dict()}

    def compare(self, comparisons: list[tuple[list[dict], str, str]], progress: bool = False) -> list[float]:
        probabilities, counts = win_probabilities(self.model, self.tokenizer, self.template, comparisons,
                                                  self.batch_size, self.max_length, progress=progress)
        self.counts["comparisons"] += len(comparisons)
        self.counts["truncated_sequences"] += counts["truncated_sequences"]
        return probabilities

    def rank(self, groups: list[tuple[list[dict], list[str]]], mode: str | None = None) -> list[list[float]]:
        return tournament_scores(self.compare, groups, mode or self.tournament)

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        keys = [json.dumps(p, sort_keys=True) for p in prompts]
        order: dict[str, list[int]] = {}
        for index, key in enumerate(keys):
            order.setdefault(key, []).append(index)
        members = list(order.values())
        groups = [(prompts[m[0]], [responses[i] for i in m]) for m in members]
        scores = [0.0] * len(responses)
        for m, group_scores in zip(members, self.rank(groups)):
            for i, value in zip(m, group_scores):
                scores[i] = value
        return scores
