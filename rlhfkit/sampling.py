"""Sampling from a causal LM: left-padded prompt batches, our own KV-cache decoding loop, stop tokens, per-row seeds.

Used by `generation/generate.py` (the HF backend) and by `ppo_train.py` (rollouts).

Why a loop of our own rather than `model.generate`:
- **On-policy by construction** (the processors: `rlhfkit/logits_processors.py`). `generate` fills every field its
  caller leaves unset from the checkpoint's `generation_config.json`, so a shipped `repetition_penalty`,
  `no_repeat_ngram_size`, `min_new_tokens`, `suppress_tokens` or `bad_words_ids` silently changes the distribution
  samples come from, while PPO's log-probs use `logits / T`. Here the logits reach the sampling rule untouched unless the caller asks for the
  checkpoint's processors (`checkpoint_processors=True`, what plain generation does by default) or for suppressed
  tokens (the same `suppress_tokens` function then runs where PPO computes log-probs).
- **Per-row seeds.** `generate(do_sample=True)` draws every row from one global RNG, so a prompt's samples depend
  on which other prompts share its batch (and so on the batch size and on the shard it lands in). Here each
  (prompt, sample) row owns a `torch.Generator` seeded from `(seed, prompt, sample index)`; its uniforms are
  drawn up front and each token is drawn by inverse CDF. A prompt's samples are then the same whatever batch or
  shard it is in (up to float rounding of logits between batch shapes, which moves a draw only when it falls
  within ~1e-6 of a CDF boundary).
- **Less work on a CPU.** Each prompt is prefilled once for its K samples; a row leaves the batch and the KV
  cache at its stop token instead of being computed until the longest row ends (benchmarks/bench_generate.py).
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
from .logits_processors import CheckpointProcessors, checkpoint_processor_settings, suppress_tokens
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


def truncate_at_stop(token_ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """Ids up to and including the first stop token, and whether one was found."""
    stops = set(stop_ids)
    for position, token in enumerate(token_ids):
        if token in stops:
            return list(token_ids[: position + 1]), True
    return list(token_ids), False


# ---------------------------------------------------------------------------------------------------------------
# the decoding loop
# ---------------------------------------------------------------------------------------------------------------
# The keyword a causal LM's forward takes its KV cache by: `past_key_values` up to transformers 5.23, `cache` from
# 5.24 (which still takes `past_key_values`, deprecated, with a warning per call). A name the forward does not know
# lands in its `**kwargs` and is dropped without an error: no cache, every step sees one token, garbage text. So the
# name is read from the signature, and `decode` checks after the prefill that the cache was really filled.
CACHE_KEYWORDS = ("cache", "past_key_values")


def _inner_models(model):
    """`model` and what it wraps (PEFT's base model, DDP's/accelerate's `.module`), outermost first."""
    seen, queue = set(), [model]
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        queue.append(getattr(current, "module", None))
        get_base = getattr(current, "get_base_model", None)
        if callable(get_base):
            try:
                queue.append(get_base())
            except Exception:  # a wrapper whose base model is not set up: nothing further to inspect
                pass


def cache_keywords(model) -> list[str]:
    """The cache keywords to try, in order: the one the forward (or the model it wraps) declares first."""
    import inspect

    for current in _inner_models(model):
        try:
            parameters = inspect.signature(current.forward).parameters
        except (TypeError, ValueError):
            continue
        for keyword in CACHE_KEYWORDS:
            if keyword in parameters:
                return [keyword] + [other for other in CACHE_KEYWORDS if other != keyword]
    return list(CACHE_KEYWORDS)


def _forward(model, input_ids, attention_mask, position_ids, cache, keyword: str):
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                 logits_to_keep=1, **{keyword: cache}).logits[:, -1]


def _prefill(model, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, object, str]:
    """The prefill forward with a fresh KV cache: (last logits, the filled cache, the keyword that filled it).

    Raises a one-line `UserError` when the forward ignores the cache under every keyword (decoding without it would
    silently produce garbage)."""
    import transformers
    from transformers import DynamicCache

    for keyword in cache_keywords(model):
        cache = DynamicCache(config=model.config)
        logits = _forward(model, input_ids, attention_mask, position_ids, cache, keyword)
        if cache.get_seq_length() > 0:
            return logits, cache, keyword
    raise UserError(
        f"the forward of {type(model).__name__} ignored the KV cache passed as {' or '.join(CACHE_KEYWORDS)} "
        f"(transformers {transformers.__version__}); decoding without it would give wrong samples"
    )


@torch.no_grad()
def decode(model, batch: dict[str, torch.Tensor], n: int, max_new_tokens: int, choose, stop_ids: Sequence[int],
           pad_id: int, processors=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Autoregressive decoding with a KV cache; returns (tokens [B·n, T], lengths [B·n], logprobs [B·n, T]).

    batch: left-padded prompts `[B, P]` (`build_prompt_batch`); row r of the output is sample r % n of prompt r // n.
    choose(scores [A, V] float, rows [A], step) → (tokens [A], logprobs [A]): the sampling rule, on the raw
    logits unless `processors` (`CheckpointProcessors`) change them first.

    What `model.generate` would do differently, and why not here:
    - it fills every unset field from the checkpoint's `generation_config.json` (repetition penalty, suppressed
      tokens, ...), so the samples would come from another distribution than the model's logits; here the logits
      are only what `choose` sees, so PPO's log-probs are those of the sampling distribution by construction;
    - it runs the prompt once per sample; here each prompt is prefilled once and its cache repeated n times;
    - it keeps computing finished rows until the last row stops; here a row leaves the batch (and the cache) at
      its stop token.
    Tokens after a row's end are `pad_id`; `lengths` counts generated tokens, the stop token included.
    """
    device = batch["input_ids"].device
    prompts, width = batch["input_ids"].shape
    total = prompts * n
    attention_mask = batch["attention_mask"]
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    logits, cache, keyword = _prefill(model, batch["input_ids"], attention_mask, position_ids)
    if n > 1:
        logits = logits.repeat_interleave(n, dim=0)
        cache.batch_repeat_interleave(n)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
        position_ids = position_ids.repeat_interleave(n, dim=0)
    next_position = position_ids[:, -1:] + 1
    tokens = torch.full((total, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((total, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(total, dtype=torch.long, device=device)
    sequences = None
    if processors is not None:  # processors read the whole sequence so far (prompt + generated)
        sequences = torch.cat([batch["input_ids"].repeat_interleave(n, dim=0), tokens], dim=1)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    rows = torch.arange(total, device=device)  # the output rows still being generated, in cache order
    for step in range(max_new_tokens):
        scores = logits.float()
        if processors is not None:
            scores = processors(sequences[rows, : width + step], scores, rows)
        choice, choice_logprobs = choose(scores, rows, step)
        tokens[rows, step] = choice
        logprobs[rows, step] = choice_logprobs
        lengths[rows] += 1
        if sequences is not None:
            sequences[rows, width + step] = choice
        if step == max_new_tokens - 1:
            break
        running = ~torch.isin(choice, stops)
        if not running.all():
            if not running.any():
                break
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, choice = rows[keep], choice[keep]
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
        logits = _forward(model, choice.unsqueeze(1), attention_mask, next_position, cache, keyword)
        next_position = next_position + 1
    return tokens, lengths, logprobs


class SeededChoice:
    """The sampling rule of `decode`: softmax(scores / T), optional nucleus, inverse CDF on pre-drawn uniforms.

    uniforms: `[rows, max_new_tokens]`, one row per output row; step t uses column t. `temperature <= 0` is greedy.
    The log-prob returned is that of the distribution the token was drawn from (after the nucleus filter,
    renormalised), i.e. what an importance ratio against this sampler needs.
    """

    def __init__(self, uniforms: torch.Tensor, temperature: float, top_p: float, suppressed: Sequence[int] = ()):
        self.uniforms, self.temperature, self.top_p = uniforms, temperature, top_p
        self.suppressed = list(suppressed)

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = suppress_tokens(scores, self.suppressed)
        if self.temperature <= 0:
            choice = scores.argmax(dim=-1)
            return choice, torch.log_softmax(scores, dim=-1).gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        probs = torch.softmax(scores / self.temperature, dim=-1)
        probs = filter_top_p(probs, self.top_p)
        choice = sample_inverse_cdf(probs, self.uniforms[rows.cpu(), step].to(probs.device))
        chosen = probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1) / probs.sum(dim=-1)
        return choice, chosen.clamp(min=torch.finfo(chosen.dtype).tiny).log()


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
    suppressed_tokens: Sequence[int] = (),
    checkpoint_processors: bool = False,
) -> list[list[dict]]:
    """`n` samples for each prompt (message lists), decoded together (`decode`).

    Returns, per prompt, `n` dicts `{"text", "token_ids", "finished", "logprobs"}`: `token_ids` end with the first
    stop token when `finished`; `text` is decoded without special tokens; `logprobs` are the sampling
    distribution's log-probs of `token_ids`.

    Distribution: softmax(logits / temperature), nucleus-filtered when top_p < 1, `suppressed_tokens` impossible;
    nothing from the checkpoint's `generation_config.json` unless `checkpoint_processors=True` (then its repetition
    penalty, n-gram ban, minimum length, suppressed and bad words apply, as `model.generate` would apply them).

    Seeds: sample j of prompt p uses `derive_seed(prompt_seeds[p], j)`. Without `prompt_seeds`, a prompt's seed
    is `derive_seed(seed, content of the prompt, its occurrence in this call)`, so a prompt's samples do not
    depend on the rest of its batch; with `seed=None` they are drawn from torch's global RNG. A caller that samples
    the same prompts again (PPO over epochs) should vary `seed` per call (e.g. `seed + step`), or the uniforms
    repeat. `temperature <= 0` is greedy decoding.
    """
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
    batch = build_prompt_batch([render_generation_prompt(tokenizer, messages) for messages in prompts], pad_id, device)
    uniforms = torch.stack(
        [
            torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(derive_seed(prompt_seed, sample)))
            for prompt_seed in prompt_seeds
            for sample in range(n)
        ]
    )
    processors = None
    if checkpoint_processors:
        settings = checkpoint_processor_settings(model)
        if settings:
            pad_lengths = (batch["attention_mask"] == 0).sum(dim=1).repeat_interleave(n)
            processors = CheckpointProcessors(settings, batch["input_ids"].shape[1], pad_lengths, stop_ids)
    choose = SeededChoice(uniforms, temperature, top_p, suppressed_tokens)
    tokens, lengths, logprobs = decode(model, batch, n, max_new_tokens, choose, stop_ids, pad_id, processors)
    tokens, lengths, logprobs = tokens.tolist(), lengths.tolist(), logprobs.tolist()
    results: list[list[dict]] = []
    for prompt_index in range(len(prompts)):
        samples = []
        for sample in range(n):
            row = prompt_index * n + sample
            ids, finished = truncate_at_stop(tokens[row][: lengths[row]], stop_ids)
            samples.append({"text": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids,
                            "finished": finished, "logprobs": logprobs[row][: len(ids)]})
        results.append(samples)
    return results
