"""DPO models as reward models, as RewardBench scores them (allenai/reward-bench `rewardbench/dpo.py`
`DPOInference.tokenize_row`, `get_batch_logps`; `scripts/run_dpo.py`): the tokenization of a pair, the reduction
of per-token log-probs, and the batched log-prob sums through the pairwise forward. `rlhfkit/eval/rewardbench.py`'s
docstring states the rules; `rlhfkit/eval/reward_scoring.py` uses them for every benchmark."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rlhfkit.errors import UserError

DPO_MAX_LENGTH = 2048  # rewardbench/dpo.py DPOInference.max_length
DPO_MAX_PROMPT_LENGTH = 128  # DPOInference.max_prompt_length, truncation_mode "keep_end"
REF_FREE_TYPES = ("avg", "sum", "norm")  # scripts/run_dpo.py --ref_free_type, default "avg"


def _tokenize_answer(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """DPOInference.build_tokenized_answer: enc(prompt + answer) split at len(enc(prompt)), one token earlier when the
    last prompt token merged with the answer."""
    full = list(tokenizer(prompt + answer, add_special_tokens=False)["input_ids"])
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if len(prompt_ids) > len(full):
        raise UserError("the prompt tokenizes longer than prompt + response; RewardBench's DPO tokenization cannot "
                        "split this pair")
    start = len(prompt_ids)
    if prompt_ids != full[:start]:
        start -= 1
    return full[:start], full[start:]


@dataclass
class DpoPair:
    chosen_ids: list[int]
    chosen_start: int  # first response token
    rejected_ids: list[int]
    rejected_start: int
    prompt_truncated: bool = False
    response_truncated: bool = False


def dpo_tokenize_pair(tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict],
                      max_length: int = DPO_MAX_LENGTH, max_prompt_length: int = DPO_MAX_PROMPT_LENGTH) -> DpoPair:
    """DPOInference.tokenize_row on a canonical pair, number for number.

    Prompt text = the chat template on the prompt without a generation prompt; response text = the full rendering
    with every occurrence of the prompt text removed (`str.replace`, reward-bench issue 140). BOS (EOS if the tokenizer
    has none, as run_dpo.py sets) goes before the prompt, EOS after the response. When prompt + the longer response
    exceed `max_length`, the prompt keeps its last `max_prompt_length` tokens; if still too long, both responses keep
    their first `max_length − max_prompt_length` tokens.
    """
    from rlhfkit.tokenization import render_text

    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token; RewardBench's DPO scoring appends one to every response")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if max_length <= max_prompt_length:  # only reachable through a model position limit below 2 × 128 (extra)
        max_prompt_length = max(1, max_length // 2)
    prompt_text = render_text(tokenizer, list(prompt))
    parts = []
    for response in (chosen, rejected):
        answer = render_text(tokenizer, list(prompt) + list(response)).replace(prompt_text, "")
        prompt_ids, answer_ids = _tokenize_answer(tokenizer, prompt_text, answer)
        parts.append([[bos] + prompt_ids, answer_ids + [eos]])
    longer = max(len(parts[0][1]), len(parts[1][1]))
    prompt_cut = response_cut = False
    for part in parts:
        if len(part[0]) + longer > max_length:
            part[0] = part[0][-max_prompt_length:]  # keep_end
            prompt_cut = True
    for part in parts:
        if len(part[0]) + longer > max_length:
            part[1] = part[1][: max_length - max_prompt_length]
            response_cut = True
    (chosen_prompt, chosen_answer), (rejected_prompt, rejected_answer) = parts
    return DpoPair(chosen_prompt + chosen_answer, len(chosen_prompt), rejected_prompt + rejected_answer,
                   len(rejected_prompt), prompt_cut, response_cut)


def dpo_reduce(per_token, mask, how: str):
    """DPOInference.get_batch_logps reductions over response tokens. per_token, mask: [B, T] → [B].

    "sum": Σ log p (with a reference: the score is the policy's sum minus the reference's); "avg": Σ log p / n;
    "norm": −‖log p · mask‖₂.
    """
    import torch

    masked = per_token * mask.to(per_token.dtype)
    if how == "sum":
        return masked.sum(-1)
    if how == "avg":
        return masked.sum(-1) / mask.sum(-1).to(per_token.dtype)
    if how == "norm":
        return -torch.norm(masked, p=2, dim=-1)
    raise ValueError(f"reduction must be one of sum, {', '.join(REF_FREE_TYPES)}; got '{how}'")


def dpo_sequence_scores(model, sequences: Sequence[tuple[list[int], int]], pad_token_id: int, batch_size: int = 8,
                        how: str = "sum", progress: bool = False, desc: str = "log-probs",
                        groups: list[list[int]] | None = None, layout: str = "auto") -> list[float]:
    """Reduced response log-probs of (ids, response_start) sequences, in input order (tokens response_start … end
    scored, position 0 never: DPODataCollatorWithPadding's padding is never scored either). Runs through the
    packed pairwise forward (rlhfkit.pairwise): `groups` (a pair's chosen and rejected) compute their shared prompt
    once and the LM head runs only at scored positions; `layout="padded"` is the plain right-padded batch."""
    import torch
    from tqdm.auto import tqdm

    from rlhfkit import layout_check
    from rlhfkit import pairwise as pw
    from rlhfkit.scoring import batched_plans

    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, not {batch_size}")
    kind = layout_check.choose_layout(model, layout)
    device = next(model.parameters()).device
    ids = [list(s) for s, _ in sequences]
    score_from = [max(start, 1) for _, start in sequences]
    scores = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            plans = list(batched_plans(ids, groups, batch_size, kind, pad_token_id, score_from=score_from))
            for index, plan in tqdm(plans, desc=desc, disable=not progress):
                plan = plan.to(device)
                per_token = pw.scatter_padded(pw.token_logprobs(model, plan).log_probs, plan)
                values = dpo_reduce(per_token, pw.padded_scored_mask(plan), how).float().cpu().tolist()
                for i, value in zip(index, values):
                    scores[i] = value
    finally:
        model.train(was_training)
    return scores
