"""Sampling from a causal LM with Hugging Face `generate`: left-padded prompt batches, stop tokens, per-row seeds.

Used by `generation/generate.py` (the HF backend) and by `ppo_train.py` (rollouts).

What `generate` does not give us and is written here by hand:
- **Per-row seeds.** `generate(do_sample=True)` draws every row from one global RNG, so a prompt's samples depend
  on which other prompts share its batch (and so on the batch size and on the shard it lands in). Here each
  (prompt, sample) row owns a `torch.Generator` seeded from `(seed, prompt, sample index)`; its uniforms are
  drawn up front and a logits processor samples by inverse CDF, then `generate` runs greedily on the one token
  left. A prompt's samples are then the same whatever batch or shard it is in (up to float rounding of logits
  between padded batch shapes, which moves a draw only when it falls within ~1e-6 of a CDF boundary).
- **Stop tokens.** Chat models end a turn with a template token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`)
  that is often not the tokenizer's `eos_token`; `stop_token_ids` collects both.
- **Truncation.** The response ids stop right after the first stop token (kept, so PPO can score it); what
  follows (padding) is cut, and the text is decoded without special tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

from .errors import UserError
from .tokenization import render_ids

# End-of-turn tokens of common chat templates; only those the tokenizer really has as special tokens are used.
# `<|endoftext|>` is left out: some tokenizers (ours, GPT-2 style) use it as BOS, and where it ends text it is EOS.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eom_id|>")


# ---------------------------------------------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------------------------------------------
def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from a base seed and keys (prompt id, sample index); stable across runs and machines.

    Python's `hash()` is salted per process, so it cannot be used for this.
    """
    text = json.dumps([int(seed), *[str(key) for key in keys]])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") & ((1 << 63) - 1)


def prompt_key(messages: Sequence[dict]) -> str:
    """Content key of a prompt (the default seed key when the caller gives no prompt id)."""
    return hashlib.sha256(json.dumps(list(messages), sort_keys=True).encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# prompts → token ids → a left-padded batch
# ---------------------------------------------------------------------------------------------------------------
def render_generation_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of `messages` plus the assistant header, from the chat template tokenized in one pass.

    Tokenized inside `apply_chat_template` (`rlhfkit.tokenization.render_ids`): rendering text and tokenizing it
    again would add a second BOS.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"tokenizer of '{getattr(tokenizer, 'name_or_path', '?')}' has no chat template; pass --chat_template"
        )
    return render_ids(tokenizer, list(messages), add_generation_prompt=True)


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:  # only ever attended to as padding (mask 0), so any id is fine
        return int(tokenizer.eos_token_id)
    return 0


def build_prompt_batch(prompt_ids: Sequence[Sequence[int]], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Left-pad token-id lists into `input_ids` / `attention_mask`, both `[batch, max_prompt_len]`.

    Left padding puts every prompt's last token in the last column, so new tokens are appended at one position
    for the whole batch and the KV cache stays rectangular.
    """
    if not prompt_ids:
        raise ValueError("build_prompt_batch needs at least one prompt")
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {row} is empty")
        input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def build_message_batch(tokenizer, prompts: Sequence[Sequence[dict]], device=None) -> dict[str, torch.Tensor]:
    """`build_prompt_batch` from message lists rendered with the tokenizer's chat template."""
    return build_prompt_batch([render_generation_prompt(tokenizer, m) for m in prompts], pad_token_id(tokenizer), device)


# ---------------------------------------------------------------------------------------------------------------
# stop tokens
# ---------------------------------------------------------------------------------------------------------------
def _special_id(tokenizer, token: str) -> int | None:
    """Id of `token` if the tokenizer has it as one added/special token (not split into pieces, not unk)."""
    added = getattr(tokenizer, "get_added_vocab", lambda: {})()
    if token in added:
        return int(added[token])
    vocab_id = tokenizer.convert_tokens_to_ids(token)
    if isinstance(vocab_id, int) and vocab_id != tokenizer.unk_token_id and token in tokenizer.all_special_tokens:
        return vocab_id
    return None


def _template_end_of_turn(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant message's content, if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = "zqxv probe"
    try:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
            tokenize=True,
            return_dict=False,
        )
    except Exception:  # templates that reject this probe (e.g. require a system turn): fall back to the list
        return None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ids = list(ids)
    probe_ids = tokenizer.encode(probe, add_special_tokens=False)
    tail = probe_ids[-1:]
    for start in range(len(ids) - 1, -1, -1):  # last occurrence of the probe's last token
        if ids[start : start + 1] == tail:
            following = ids[start + 1 : start + 2]
            if following and following[0] in set(tokenizer.all_special_ids):
                return int(following[0])
            return None
    return None


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS plus the chat template's end-of-turn token(s), deduplicated, EOS first.

    Sources: `tokenizer.eos_token_id`, the model's `generation_config.eos_token_id` (an int or a list; Llama-3
    lists `<|eot_id|>` there), the special token the chat template writes after an assistant turn, and the
    known end-of-turn tokens the tokenizer has as special tokens.
    """
    ids: list[int] = []

    def add(value):
        if value is None:
            return
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and int(item) not in ids:
                ids.append(int(item))

    add(tokenizer.eos_token_id)
    if model is not None and getattr(model, "generation_config", None) is not None:
        add(model.generation_config.eos_token_id)
    add(_template_end_of_turn(tokenizer))
    for token in KNOWN_END_OF_TURN:
        add(_special_id(tokenizer, token))
    if not ids:
        raise UserError(f"tokenizer of '{getattr(tokenizer, 'name_or_path', '?')}' has no EOS or end-of-turn token")
    return ids


# ---------------------------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------------------------
def filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability reaches `top_p` (always ≥ 1 token).

    probs: `[batch, vocab]`, rows summing to 1. Returns `[batch, vocab]` with the dropped tokens set to 0 (not
    renormalised).
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def sample_inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token per row: the first index whose cumulative weight exceeds `u · total`.

    weights: `[batch, vocab]`, non-negative, not necessarily normalised. uniforms: `[batch]` in [0, 1).
    Returns `[batch]` long.
    """
    # float64 keeps the CDF exact enough over 100k+ vocabularies; MPS has no float64
    dtype = torch.float32 if weights.device.type == "mps" else torch.float64
    cumulative = torch.cumsum(weights.to(dtype), dim=-1)
    targets = uniforms.to(dtype).unsqueeze(-1) * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, targets, right=True).squeeze(-1)
    return index.clamp_(max=weights.shape[-1] - 1)


class SeededSampler:
    """A `generate` logits processor that samples each row with its own pre-drawn uniforms.

    It returns scores that are −inf everywhere except the sampled token, so `generate(do_sample=False)` picks it.
    uniforms: `[batch, max_new_tokens]`; step t of generation uses column t.
    """

    def __init__(self, uniforms: torch.Tensor, prompt_width: int, temperature: float, top_p: float):
        self.uniforms = uniforms
        self.prompt_width = prompt_width
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        if self.temperature <= 0:
            choice = scores.argmax(dim=-1)
        else:
            probs = torch.softmax(scores.float() / self.temperature, dim=-1)
            probs = filter_top_p(probs, self.top_p)
            choice = sample_inverse_cdf(probs, self.uniforms[:, step].to(probs.device))
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(-1, choice.unsqueeze(-1), 0.0)
        return forced


def truncate_at_stop(token_ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """Ids up to and including the first stop token, and whether one was found."""
    stops = set(stop_ids)
    for position, token in enumerate(token_ids):
        if token in stops:
            return list(token_ids[: position + 1]), True
    return list(token_ids), False


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[Sequence[dict]],
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    prompt_seeds: Sequence[int] | None = None,
    stop_ids: Sequence[int] | None = None,
) -> list[list[dict]]:
    """`n` samples for each prompt (message lists) in one batched `generate` call.

    Returns, per prompt, `n` dicts `{"text", "token_ids", "finished"}`: `token_ids` end with the first stop
    token when `finished`; `text` is decoded without special tokens.

    Seeds: sample j of prompt p uses `derive_seed(prompt_seeds[p], j)`. Without `prompt_seeds`, a prompt's seed
    is `derive_seed(seed, content of the prompt, its occurrence in this call)`, so a prompt's samples do not
    depend on the rest of its batch; with `seed=None` they are drawn from torch's global RNG. A caller that samples
    the same prompts again (PPO over epochs) should vary `seed` per call (e.g. `seed + step`), or the uniforms
    repeat. `temperature <= 0` is greedy decoding.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if n < 1 or max_new_tokens < 1:
        raise ValueError("n and max_new_tokens must be ≥ 1")
    if not prompts:
        return []
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if prompt_seeds is None:
        if seed is None:
            prompt_seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
        else:
            occurrences: dict[str, int] = {}
            prompt_seeds = []
            for messages in prompts:  # a repeated prompt gets fresh samples, not copies of the first
                key = prompt_key(messages)
                prompt_seeds.append(derive_seed(seed, key, occurrences.get(key, 0)))
                occurrences[key] = occurrences.get(key, 0) + 1
    if len(prompt_seeds) != len(prompts):
        raise ValueError("prompt_seeds must have one seed per prompt")
    stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, model)
    pad_id = pad_token_id(tokenizer)

    device = next(model.parameters()).device
    rows = [render_generation_prompt(tokenizer, messages) for messages in prompts for _ in range(n)]
    batch = build_prompt_batch(rows, pad_id, device)
    prompt_width = batch["input_ids"].shape[1]
    uniforms = torch.stack(
        [
            torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(derive_seed(prompt_seed, sample)))
            for prompt_seed in prompt_seeds
            for sample in range(n)
        ]
    )
    config = GenerationConfig(
        do_sample=False,  # sampling happens in SeededSampler; greedy then takes its single allowed token
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        use_cache=True,
    )
    sequences = model.generate(
        **batch,
        generation_config=config,
        logits_processor=LogitsProcessorList([SeededSampler(uniforms, prompt_width, temperature, top_p)]),
    )
    new_tokens = sequences[:, prompt_width:].tolist()
    results: list[list[dict]] = []
    for prompt_index in range(len(prompts)):
        samples = []
        for sample in range(n):
            ids, finished = truncate_at_stop(new_tokens[prompt_index * n + sample], stop_ids)
            samples.append(
                {"text": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids, "finished": finished}
            )
        results.append(samples)
    return results
