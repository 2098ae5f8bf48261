"""rlhfkit.sampling: stop tokens, left padding, nucleus filter, inverse-CDF draws, seeded batched generation."""

from __future__ import annotations

import contextlib

import copy

import pytest
import torch

from rlhfkit.errors import UserError
from rlhfkit.sampling import (
    build_prompt_batch,
    derive_seed,
    filter_top_p,
    generate_batch,
    render_generation_prompt,
    sample_inverse_cdf,
    stop_token_ids,
    truncate_at_stop,
)

PROMPTS = [
    [{"role": "user", "content": "tell me a long story about the sea and a lighthouse keeper"}],
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be kind"}, {"role": "user", "content": "write a poem about a cat"}],
]


@pytest.fixture(scope="module")
def policy(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)



@contextlib.contextmanager
def eos_favoured(model, eos: int, bias: float):
    """EOS made likelier, not certain (its logit raised by `bias`), so sample lengths vary."""

    def favour_eos(module, inputs, output):
        output = output.clone()
        output[..., eos] += bias
        return output

    handle = model.lm_head.register_forward_hook(favour_eos)
    try:
        yield
    finally:
        handle.remove()


def test_stop_tokens_of_chatml_are_eos_only(policy):
    model, tokenizer = policy
    assert tokenizer.eos_token == "<|im_end|>"
    # <|im_end|> is both EOS and the template's end of turn; BOS (<|endoftext|> here) must not stop generation
    assert stop_token_ids(tokenizer, model) == [tokenizer.eos_token_id]


def test_stop_tokens_include_template_end_of_turn_distinct_from_eos():
    from rlhfkit.builtin_models import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|start_header_id|>"]})
    tokenizer.eos_token = "<|endoftext|>"  # like Llama-3 base: EOS is not what ends an assistant turn
    tokenizer.chat_template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant\n{% endif %}"
    )
    ids = stop_token_ids(tokenizer)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in ids
    assert tokenizer.convert_tokens_to_ids("<|start_header_id|>") not in ids


def test_build_prompt_batch_left_pads():
    batch = build_prompt_batch([[5, 6, 7], [9]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_render_generation_prompt_ends_with_assistant_header(policy):
    _, tokenizer = policy
    ids = render_generation_prompt(tokenizer, PROMPTS[1])
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert ids.count(tokenizer.bos_token_id) <= 1


def test_filter_top_p_hand_computed():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    # sorted: 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95
    assert filter_top_p(probs, 0.7)[0].tolist() == pytest.approx([0.0, 0.5, 0.0, 0.3])
    assert filter_top_p(probs, 0.5)[0].tolist() == pytest.approx([0.0, 0.5, 0.0, 0.0])
    assert filter_top_p(probs, 0.81)[0].tolist() == pytest.approx([0.15, 0.5, 0.0, 0.3])
    assert filter_top_p(probs, 1.0)[0].tolist() == pytest.approx(probs[0].tolist())


def test_sample_inverse_cdf_hand_computed():
    weights = torch.tensor([[1.0, 0.0, 3.0]] * 4)  # cumulative 1, 1, 4
    uniforms = torch.tensor([0.1, 0.2499, 0.25, 0.99])
    # u·4 = 0.4 → 0; 0.9996 → 0; 1.0 → first cumulative > 1 is index 2 (a zero-weight token is never drawn); 3.96 → 2
    assert sample_inverse_cdf(weights, uniforms).tolist() == [0, 0, 2, 2]


def test_truncate_at_stop():
    assert truncate_at_stop([4, 5, 2, 3, 3], [2, 9]) == ([4, 5, 2], True)
    assert truncate_at_stop([4, 9, 2], [2, 9]) == ([4, 9], True)
    assert truncate_at_stop([4, 5], [2]) == ([4, 5], False)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(42, "a", 0) == derive_seed(42, "a", 0)
    assert len({derive_seed(42, "a", 0), derive_seed(42, "a", 1), derive_seed(42, "b", 0), derive_seed(43, "a", 0)}) == 4
    assert 0 <= derive_seed(1, "x") < 2**63


def test_generate_batch_seeded_and_batch_independent(policy):
    model, tokenizer = policy
    batched = generate_batch(model, tokenizer, PROMPTS, n=2, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    again = generate_batch(model, tokenizer, PROMPTS, n=2, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    alone = [generate_batch(model, tokenizer, [p], n=2, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)[0]
             for p in reversed(PROMPTS)][::-1]
    other = generate_batch(model, tokenizer, PROMPTS, n=2, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8)
    ids = lambda result: [[s["token_ids"] for s in samples] for samples in result]  # noqa: E731
    assert ids(batched) == ids(again)
    assert ids(batched) == ids(alone)  # a prompt's samples do not depend on its batch
    assert ids(batched) != ids(other)
    assert all(samples[0]["token_ids"] != samples[1]["token_ids"] for samples in batched)
    for samples in batched:
        for sample in samples:
            assert sample["text"] == tokenizer.decode(sample["token_ids"], skip_special_tokens=True)


def _generate_greedy(model, tokenizer, prompt, max_new_tokens):
    """`model.generate`'s greedy continuation of one prompt (no padding), cut after EOS."""
    ids = torch.tensor([render_generation_prompt(tokenizer, prompt)])
    reference = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    return truncate_at_stop(reference[0, ids.shape[1]:].tolist(), [tokenizer.eos_token_id])[0]


def test_greedy_matches_hf_generate(policy):
    """Our loop (left-padded batch of prompts of different lengths, KV cache, K=2 rows per prompt) gives exactly
    `model.generate`'s greedy tokens, on whatever transformers version is installed."""
    model, tokenizer = policy
    ours = generate_batch(model, tokenizer, PROMPTS, n=2, max_new_tokens=12, temperature=0.0, top_p=1.0, seed=None)
    for prompt, samples in zip(PROMPTS, ours):
        expected = _generate_greedy(model, tokenizer, prompt, 12)
        assert len(expected) == 12 and len(set(expected)) > 2  # a real continuation, not a stuck token
        assert [s["token_ids"] for s in samples] == [expected, expected]


def test_greedy_matches_hf_generate_through_peft(policy):
    """PPO's policy can be a PEFT model, whose forward declares no cache keyword: the one its base model declares is
    used (a zero-initialised LoRA leaves the outputs unchanged)."""
    from peft import LoraConfig, get_peft_model

    from rlhfkit.sampling import cache_keywords

    model, tokenizer = policy
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    assert cache_keywords(wrapped)[0] == cache_keywords(model)[0]
    ours = generate_batch(wrapped, tokenizer, PROMPTS[:2], n=1, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=None)
    assert [samples[0]["token_ids"] for samples in ours] == [_generate_greedy(model, tokenizer, p, 8) for p in PROMPTS[:2]]


def test_cache_keyword_is_the_installed_transformers_one(policy):
    """transformers 5.24 renamed the forward's `past_key_values` to `cache`; a name the forward does not declare is
    silently swallowed by its **kwargs, so the declared one must come first."""
    import inspect

    from rlhfkit.sampling import cache_keywords

    model, _ = policy
    declared = [k for k in ("cache", "past_key_values") if k in inspect.signature(type(model).forward).parameters]
    assert cache_keywords(model)[0] == declared[0]


def test_forward_ignoring_the_cache_fails_loudly(policy):
    """A forward that drops the cache (as 5.19's did with `cache=`) must stop decoding, not produce garbage."""
    model, tokenizer = policy

    class DropsCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0,
                    **kwargs):  # the cache keyword lands here and is dropped
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=use_cache, logits_to_keep=logits_to_keep)

    with pytest.raises(UserError, match="ignored the KV cache"):
        generate_batch(DropsCache(model), tokenizer, PROMPTS[:1], n=1, max_new_tokens=4, temperature=0.0, top_p=1.0,
                       seed=None)


def test_sampled_logprobs_equal_a_full_forward(policy):
    """Sampling with the cache (rows dropped at EOS, left padding, K rows sharing one prefill) gives, per token, the
    log-prob a full forward over prompt + response gives: the cache holds what a fresh pass would compute."""
    model, tokenizer = policy
    eos = tokenizer.eos_token_id

    with eos_favoured(model, eos, 3.0):
        result = generate_batch(model, tokenizer, PROMPTS, n=3, max_new_tokens=10, temperature=1.0, top_p=1.0, seed=4)
        lengths = {len(s["token_ids"]) for group in result for s in group}
        assert len(lengths) > 1  # some rows left the batch early
        for prompt, samples in zip(PROMPTS, result):
            prompt_ids = render_generation_prompt(tokenizer, prompt)
            for sample in samples:
                ids = torch.tensor([prompt_ids + sample["token_ids"]])
                logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1].float()
                full = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(sample["token_ids"])[:, None])[:, 0]
                assert torch.allclose(torch.tensor(sample["logprobs"]), full, atol=1e-4)


def test_generation_stops_at_eos_and_truncates(policy):
    model, tokenizer = policy
    eos = tokenizer.eos_token_id

    with eos_favoured(model, eos, 4.0):
        result = generate_batch(model, tokenizer, PROMPTS, n=4, max_new_tokens=10, temperature=1.0, top_p=1.0, seed=3)
    samples = [s for group in result for s in group]
    assert any(s["finished"] for s in samples) and any(len(s["token_ids"]) > 1 for s in samples)
    for sample in samples:
        if sample["finished"]:
            assert sample["token_ids"][-1] == eos and sample["token_ids"].count(eos) == 1
            assert tokenizer.pad_token_id not in sample["token_ids"]
        else:
            assert len(sample["token_ids"]) == 10 and eos not in sample["token_ids"]
        assert "<|im_end|>" not in sample["text"]


def test_repeated_prompt_gets_fresh_samples(policy):
    model, tokenizer = policy
    result = generate_batch(model, tokenizer, [PROMPTS[1], PROMPTS[1]], n=1, max_new_tokens=8, temperature=1.0,
                            top_p=1.0, seed=5)
    assert result[0][0]["token_ids"] != result[1][0]["token_ids"]
