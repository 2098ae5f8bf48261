"""Rollouts: sampling a step's responses with our decoding loop, the forward passes that score them under the
policy and the reference, which prompts a step takes (a function of the step alone, so a resume takes the same),
and dynamic sampling's extra draws."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rlhfkit.rl import estimators as rl
from rlhfkit.rl.config import PPOConfig
from rlhfkit.logits_processors import suppress_tokens
from rlhfkit.rl.networks import suppressed_token_ids



@dataclass
class Rollout:
    """One step's samples. Rows are prompt-major (prompt i owns rows i·K … i·K+K−1)."""

    prompts: list[list[dict]]  # [B] prompt messages, repeated K times
    texts: list[str]  # [B] decoded responses (no special tokens)
    input_ids: torch.Tensor  # [B, P+T] left-padded prompt followed by the response
    attention_mask: torch.Tensor  # [B, P+T]; 0 on left padding and after the stop token
    position_ids: torch.Tensor  # [B, P+T]
    responses: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] float, response tokens up to and including the stop token
    has_stop: torch.Tensor  # [B] bool
    sample_logprobs: torch.Tensor  # [B, T] log-probs of the sampling distribution (0 on padding)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, matching what `generate` used (else log-probs shift)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def rollout(policy, tokenizer, prompt_rows: list[dict], prompt_ids: list[list[int]], prompt_seeds: list[int],
            args: PPOConfig, stop_ids: list[int], device, sampler=None) -> Rollout:
    """Sample K responses per prompt with `rlhfkit.sampling.generate_batch` and lay them out as tensors.

    sampler: instead, `sampler(prompt_ids, prompt_seeds, K)` returning the samples flattened prompt-major in
    generate_batch's dicts (the vLLM engine, `rlhfkit.rl.vllm_rollout.VLLMRollout.generate`); `policy` is unused."""
    from rlhfkit.sampling import build_prompt_batch, generate_batch, pad_token_id

    k = args.num_samples_per_prompt
    chunk = args.generation_batch_size or len(prompt_rows)
    suppressed = suppressed_token_ids(tokenizer, args.suppress_tokens)
    samples: list[dict] = [] if sampler is None else list(sampler(prompt_ids, prompt_seeds, k))
    for start in range(0, len(prompt_rows) if sampler is None else 0, chunk):
        rows = prompt_rows[start : start + chunk]
        generated = generate_batch(  # raw logits / T: never the checkpoint's generation_config processors
            policy, tokenizer, [row["prompt"] for row in rows], n=k, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=None,
            prompt_seeds=prompt_seeds[start : start + chunk], stop_ids=stop_ids, suppressed_tokens=suppressed,
        )
        samples.extend(sample for per_prompt in generated for sample in per_prompt)
    pad = pad_token_id(tokenizer)
    query = build_prompt_batch([ids for ids in prompt_ids for _ in range(k)], pad)
    width = max(1, max(len(sample["token_ids"]) for sample in samples))
    responses = torch.full((len(samples), width), pad, dtype=torch.long)
    sample_logprobs = torch.zeros((len(samples), width), dtype=torch.float32)
    lengths = torch.zeros(len(samples), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids = sample["token_ids"]
        responses[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if "logprobs" in sample:
            sample_logprobs[row, : len(ids)] = torch.tensor(sample["logprobs"], dtype=torch.float32)
        lengths[row] = len(ids)
    mask, has_stop = rl.response_mask(responses, stop_ids, lengths)
    attention_mask = torch.cat([query["attention_mask"], mask.long()], dim=1)
    input_ids = torch.cat([query["input_ids"], responses], dim=1)
    return Rollout(
        prompts=[row["prompt"] for row in prompt_rows for _ in range(k)],
        texts=[sample["text"] for sample in samples],
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=positions_from_mask(attention_mask).to(device),
        responses=responses.to(device),
        mask=mask.to(device),
        has_stop=has_stop.to(device),
        sample_logprobs=sample_logprobs.to(device),
    )


def response_plan(batch: Rollout, rows, kind: str):
    """The rows `rows` of a rollout as one `rlhfkit.pairwise.Plan`: each sample is its prompt and its response up
    to the stop token, samples of the same prompt form a group (their prompt is computed once under
    `prefix_shared`), and the scored tokens are the response tokens."""
    from rlhfkit import pairwise
    from rlhfkit.scoring import groups_by_key

    ids = batch.input_ids[rows].tolist()
    attention = batch.attention_mask[rows].tolist()
    prompt_width = batch.input_ids.shape[1] - batch.responses.shape[1]
    sequences, score_from = [], []
    for row_ids, row_mask in zip(ids, attention):
        sequences.append([token for token, keep in zip(row_ids, row_mask) if keep])
        score_from.append(sum(row_mask[:prompt_width]))
    groups = groups_by_key([tuple(seq[:start]) for seq, start in zip(sequences, score_from)])
    return pairwise.plan(sequences, groups, kind=kind, score_from=score_from).to(batch.input_ids.device)


def _response_width(values: torch.Tensor, plan_, width: int) -> torch.Tensor:
    """[M] per scored token → [B, width] (0 after each response), the padded layout's shape."""
    from rlhfkit.pairwise import scatter_padded

    out = scatter_padded(values, plan_)
    return torch.nn.functional.pad(out, (0, width - out.shape[1]))


def policy_forward(model, batch: Rollout, rows, temperature: float, layout: str = "padded", entropy: bool = False):
    """The policy's log-probs of the sampled tokens [n, T], their entropies [n, T] (when asked) and the values
    [n, T] (None without a value model) for the rollout rows `rows`, with grad.

    layout: "padded" (every sample in its padded row, through `PolicyAndValue.forward`'s logits) or a
    `rlhfkit.pairwise` layout ("prefix_shared", "packed", "varlen"; only without a value model): the same numbers
    from one forward over `response_plan`. Positions after a response's stop token hold 0 in the second case and
    whatever the padded forward gave in the first; every consumer masks them."""
    width = batch.responses.shape[1]
    if layout == "padded":
        logits, values = model(batch.input_ids[rows], batch.attention_mask[rows], batch.position_ids[rows], width,
                               temperature)
        entropies = rl.entropy_from_logits(logits) if entropy else None
        return rl.logprobs_from_logits(logits, batch.responses[rows]), entropies, values
    plan_ = response_plan(batch, rows, layout)
    scores, _ = model(plan=plan_, temperature=temperature, entropy=entropy)
    entropies = _response_width(scores.entropy, plan_, width) if entropy else None
    return _response_width(scores.log_probs, plan_, width), entropies, None


@torch.no_grad()
def forward_rollout(model, batch: Rollout, micro_batch: int, temperature: float, layout: str = "padded"):
    """Log-probs of the sampled tokens [B, T] and values [B, T] (or None), in micro batches, without grad."""
    logprobs, values = [], []
    for start in range(0, batch.responses.shape[0], micro_batch):
        rows = slice(start, start + micro_batch)
        logprob, _, value = policy_forward(model, batch, rows, temperature, layout)
        logprobs.append(logprob)
        if value is not None:
            values.append(value)
    return torch.cat(logprobs), (torch.cat(values) if values else None)


@torch.no_grad()
def reference_logprobs(ref_model, policy_unwrapped, batch: Rollout, micro_batch: int, temperature: float,
                       suppressed: list[int] | None = None, layout: str = "padded"):
    """Log-probs under the frozen reference; with LoRA and no separate reference, the policy with adapters off.

    `suppressed`: the tokens the policy may not emit are removed from the reference too, so the KL compares the
    two distributions over the same support. `layout`: as in `policy_forward`."""
    from rlhfkit.pairwise import token_logprobs

    width = batch.responses.shape[1]
    context = contextlib.nullcontext()
    model = ref_model
    if ref_model is None:
        context = policy_unwrapped.disable_adapter()
        model = policy_unwrapped
    out = []
    with context:
        for start in range(0, batch.responses.shape[0], micro_batch):
            rows = slice(start, start + micro_batch)
            if layout != "padded":
                plan_ = response_plan(batch, rows, layout)
                scores = token_logprobs(model, plan_, temperature, suppressed=suppressed or [])
                out.append(_response_width(scores.log_probs, plan_, width))
                continue
            logits = model(
                input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
                position_ids=batch.position_ids[rows], logits_to_keep=width + 1, use_cache=False,
            ).logits[:, :-1].float()
            logits = suppress_tokens(logits / temperature, suppressed or [])  # as `PolicyAndValue.forward`
            out.append(rl.logprobs_from_logits(logits, batch.responses[rows]))
    return torch.cat(out)


def concat_rollouts(batches: list[Rollout], row_index: list[tuple[int, int]], pad_id: int) -> Rollout:
    """Rows `row_index` [(batch, row)] of several rollouts as one, re-padded: prompts on the left, responses on
    the right (the layout `rollout` makes), positions recomputed."""
    width = max(b.responses.shape[1] for b in batches)
    prompt_width = max(b.input_ids.shape[1] - b.responses.shape[1] for b in batches)

    def pad(tensor, left: int, right: int, value):
        return torch.nn.functional.pad(tensor, (left, right), value=value)

    parts = []
    for b in batches:
        prompt_len, response_len = b.input_ids.shape[1] - b.responses.shape[1], b.responses.shape[1]
        left, right = prompt_width - prompt_len, width - response_len
        parts.append({
            "input_ids": pad(b.input_ids, left, right, pad_id),
            "attention_mask": pad(b.attention_mask, left, right, 0),
            "responses": pad(b.responses, 0, right, pad_id),
            "mask": pad(b.mask, 0, right, 0.0),
            "sample_logprobs": pad(b.sample_logprobs, 0, right, 0.0),
        })

    def take(name):
        return torch.stack([parts[i][name][row] for i, row in row_index])

    attention_mask = take("attention_mask")
    return Rollout(
        prompts=[batches[i].prompts[row] for i, row in row_index],
        texts=[batches[i].texts[row] for i, row in row_index],
        input_ids=take("input_ids"),
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        responses=take("responses"),
        mask=take("mask"),
        has_stop=torch.stack([batches[i].has_stop[row] for i, row in row_index]),
        sample_logprobs=take("sample_logprobs"),
    )


def rollout_seeds(seed: int, step: int, positions: list[int]) -> list[int]:
    """One sampling seed per prompt of a step, from (seed, step, prompt position): a resumed run draws the same."""
    from rlhfkit.sampling import derive_seed

    return [derive_seed(seed, "ppo", step, position) for position in positions]


def prompt_positions(step: int, per_step: int, n_prompts: int, seed: int) -> list[int]:
    """Indices of the prompts of PPO step `step` (all processes): a fresh permutation each pass over the data.

    A function of the step alone, so a resumed run takes the same prompts as an uninterrupted one.
    """
    start = step * per_step
    out = []
    while len(out) < per_step:
        position = start + len(out)
        epoch, offset = divmod(position, n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        take = min(per_step - len(out), n_prompts - offset)
        out.extend(order[offset : offset + take])
    return out

