"""The packed, prefix-shared pairwise forward equals the padded forward (rewards, log-probs, losses, gradients)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import transformers

from rlhfkit import layout_check
from rlhfkit import pairwise as pw
from rlhfkit import scoring
from rlhfkit.errors import UserError
from rlhfkit.train.losses import bradley_terry_loss

VOCAB = 96
PAD = 0


def _config(family: str, **extra):
    common = dict(vocab_size=VOCAB, pad_token_id=PAD, **extra)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        return transformers.LlamaConfig(**llama_like, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(**llama_like, **common)
    if family == "qwen3":
        return transformers.Qwen3Config(**llama_like, head_dim=8, **common)
    if family == "mistral":
        return transformers.MistralConfig(**llama_like, sliding_window=None, **common)
    if family == "mistral_window":  # a sliding window shorter than the sequences: the mask must apply it
        return transformers.MistralConfig(**llama_like, sliding_window=6, **common)
    if family == "gemma":
        return transformers.GemmaConfig(**llama_like, head_dim=8, **common)
    if family == "gemma2":  # alternating sliding / global layers, logit soft-capping
        return transformers.Gemma2Config(**llama_like, head_dim=8, sliding_window=6, **common)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
    # the other decoder families people train reward models and DPO policies on (issue 18)
    two_types = ["sliding_attention", "full_attention"]
    configs = {
        "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, max_position_embeddings=256, **common),
        "phi3": lambda: transformers.Phi3Config(**llama_like, sliding_window=None, **common),
        "phi3_window": lambda: transformers.Phi3Config(**llama_like, sliding_window=6, **common),
        "olmo2": lambda: transformers.Olmo2Config(**llama_like, **common),
        "gemma3": lambda: transformers.Gemma3TextConfig(**llama_like, head_dim=8, sliding_window=6,
                                                        layer_types=two_types, **common),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**llama_like, num_experts=4, num_experts_per_tok=2,
                                                         moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                                         **common),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**llama_like, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                         moe_intermediate_size=16, **common),
        "stablelm": lambda: transformers.StableLmConfig(**llama_like, **common),
        "cohere": lambda: transformers.CohereConfig(**llama_like, **common),
        "cohere2": lambda: transformers.Cohere2Config(**llama_like, sliding_window=6, layer_types=two_types, **common),
        "mixtral": lambda: transformers.MixtralConfig(**llama_like, num_local_experts=4, num_experts_per_tok=2,
                                                      sliding_window=None, **common),
        "gptj": lambda: transformers.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=256,
                                                **common),
        "granite": lambda: transformers.GraniteConfig(**llama_like, **common),
        "smollm3": lambda: transformers.SmolLM3Config(**llama_like, no_rope_layers=[1, 0], **common),  # a NoPE layer
        # position information the packed layouts cannot give (refused before running)
        "falcon": lambda: transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    **common),
        "falcon_alibi": lambda: transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                          alibi=True, **common),
        "bloom": lambda: transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common),
        "mpt": lambda: transformers.MptConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=256, **common),
    }
    return configs[family]()


def _model(cls_name: str, config, impl: str = "sdpa"):
    torch.manual_seed(0)
    if config.model_type in ("gemma2", "gptj", "bloom", "mpt"):
        impl = "eager"  # no SDPA path (Gemma2: attention soft-capping)
    config._attn_implementation = impl
    if cls_name == "seqcls":
        config.num_labels = 1
        model = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation=impl)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    return model.float().eval()


def _reward_or_causal(family: str):
    """The family's reward model, or its causal LM where transformers has no sequence-classification class (Cohere,
    Cohere2, Granite): the layout check then compares token log-probs."""
    try:
        return _model("seqcls", _config(family))
    except ValueError as error:
        assert "Unrecognized configuration class" in str(error)
        return _model("causal", _config(family))


def _equal_to_each_sequence_alone(model, kind: str, seed: int = 20) -> float:
    """Largest |difference| between `kind` and the padded forward on random groups (not the check's own data)."""
    sequences, groups, score_from = _groups(4, 3, seed=seed)
    plan = pw.plan(sequences, groups, kind=kind, pad_token_id=PAD, score_from=score_from)
    with torch.no_grad():
        if hasattr(model, "score"):
            return float((pw.sequence_rewards(model, plan) - _padded_rewards(model, sequences)).abs().max())
        ours = pw.sum_per_sequence(pw.token_logprobs(model, plan).log_probs, plan)
        return float((ours - _padded_logprob_sums(model, sequences, score_from)).abs().max())


def _groups(n_groups: int, k: int, seed: int, min_prompt: int = 1, max_len: int = 20):
    """Random groups of k sequences sharing a prompt; some responses start alike, one group shares everything but
    the last token (the cap on the shared prefix)."""
    rng = random.Random(seed)
    sequences, groups, score_from = [], [], []
    for g in range(n_groups):
        prompt = [rng.randint(1, VOCAB - 1) for _ in range(rng.randint(min_prompt, max_len))]
        members = []
        common = [rng.randint(1, VOCAB - 1)] if g % 3 == 1 else []
        for _ in range(k):
            response = common + [rng.randint(1, VOCAB - 1) for _ in range(rng.randint(1, 8))]
            if g % 3 == 2:
                response = [5, 6, 7][: rng.randint(1, 3)]  # short, possibly identical responses
            members.append(len(sequences))
            sequences.append(prompt + response)
            score_from.append(len(prompt))
        groups.append(members)
    return sequences, groups, score_from


def _padded_rewards(model, sequences):
    plan = pw.plan(sequences, kind="padded", pad_token_id=PAD)
    return model(**pw.model_inputs(model, plan)).logits[:, 0]


def _padded_logprob_sums(model, sequences, score_from):
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), PAD)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scored = torch.zeros_like(logp)
    for i, s in enumerate(sequences):
        scored[i, score_from[i] - 1 : len(s) - 1] = 1
    return (logp * scored).sum(1)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "mistral_window", "gemma", "gemma2", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["prefix_shared", "packed"])
def test_rewards_equal_padded_forward(family, kind):
    model = _model("seqcls", _config(family))
    sequences, groups, _ = _groups(5, 2, seed=1)
    plan = pw.plan(sequences, groups, kind=kind, pad_token_id=PAD)
    with torch.no_grad():
        ours = pw.sequence_rewards(model, plan)
        reference = _padded_rewards(model, sequences)
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    if kind == "prefix_shared":
        assert plan.computed_tokens < plan.sequence_tokens  # the prompts really were computed once


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_equal_padded_forward_with_k_responses(family):
    model = _model("causal", _config(family))
    sequences, groups, score_from = _groups(4, 4, seed=2)
    plan = pw.plan(sequences, groups, kind="prefix_shared", pad_token_id=PAD, score_from=score_from)
    with torch.no_grad():
        ours = pw.sum_per_sequence(pw.token_logprobs(model, plan).log_probs, plan)
        reference = _padded_logprob_sums(model, sequences, score_from)
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    # the LM head ran only where the next token is scored
    assert plan.logit_index.numel() == sum(len(s) - b for s, b in zip(sequences, score_from))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_backends_agree(impl):
    model = _model("seqcls", _config("llama"), impl=impl)
    sequences, groups, _ = _groups(4, 3, seed=3)
    plan = pw.plan(sequences, groups, kind="prefix_shared", pad_token_id=PAD)
    with torch.no_grad():
        assert torch.allclose(pw.sequence_rewards(model, plan), _padded_rewards(model, sequences), atol=1e-4)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoders_are_packed_not_shared(family):
    cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[family]
    config = cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64, pad_token_id=PAD, num_labels=1)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    assert layout_check.choose_layout(model, "prefix_shared") == "packed"
    sequences, groups, _ = _groups(6, 2, seed=4, max_len=12)
    offset = PAD + 1 if family == "roberta" else 0
    plan = pw.plan(sequences, groups, kind="packed", pad_token_id=PAD, position_offset=offset)
    assert plan.layout_tokens > 64  # rows longer than the model's position table are fine: positions restart
    with torch.no_grad():
        ours = pw.sequence_rewards(model, plan)
        reference = _padded_rewards(model, sequences)
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()


def test_gradients_and_one_optimizer_step_match():
    base = _model("seqcls", _config("llama"))
    sequences, groups, _ = _groups(6, 2, seed=5)
    results = {}
    for kind in ("prefix_shared", "padded"):
        model = copy.deepcopy(base).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        plan = pw.plan(sequences, groups, kind=kind, pad_token_id=PAD)
        rewards = pw.sequence_rewards(model, plan)
        loss, _ = bradley_terry_loss(rewards[0::2], rewards[1::2])
        loss.backward()
        optimizer.step()
        results[kind] = (loss.item(), [p.detach().clone() for p in model.parameters()])
    assert abs(results["prefix_shared"][0] - results["padded"][0]) < 1e-6
    for a, b in zip(results["prefix_shared"][1], results["padded"][1]):
        assert torch.allclose(a, b, atol=1e-5)


def test_group_without_a_common_prefix_stays_isolated():
    # e.g. DPO's keep_end truncation cuts chosen and rejected at different points: nothing is shared
    model = _model("causal", _config("llama"))
    sequences = [[3, 4, 5, 6, 7], [8, 9, 10, 11], [3, 4, 12], [3, 4, 13, 14]]
    plan = pw.plan(sequences, [[0, 1], [2, 3]], pad_token_id=PAD, score_from=[1, 1, 2, 2])
    with torch.no_grad():
        ours = pw.sum_per_sequence(pw.token_logprobs(model, plan).log_probs, plan)
    assert torch.allclose(ours, _padded_logprob_sums(model, sequences, [1, 1, 2, 2]), atol=1e-4)


def test_results_do_not_depend_on_packing():
    model = _model("seqcls", _config("qwen2"))
    sequences, groups, _ = _groups(8, 2, seed=6)
    with torch.no_grad():
        tight = pw.sequence_rewards(model, pw.plan(sequences, groups, pad_token_id=PAD))
        wide = pw.sequence_rewards(model, pw.plan(sequences, groups, pad_token_id=PAD, row_tokens=1000))
        alone = torch.cat([pw.sequence_rewards(model, pw.plan([sequences[i] for i in g], [[0, 1]], pad_token_id=PAD))
                           for g in groups])
    assert torch.allclose(tight, wide, atol=1e-5) and torch.allclose(tight, alone, atol=1e-5)


def test_mask_rule():
    # one row: group 0 = prefix [a b] + suffixes [c] and [d e]; group 1 = prefix [f] + [g], [h]
    sequences = [[1, 2, 3], [1, 2, 4, 5], [6, 7], [6, 8]]
    plan = pw.plan(sequences, [[0, 1], [2, 3]], pad_token_id=PAD, row_tokens=12)
    assert plan.input_ids.shape[0] == 1
    assert plan.input_ids[0, :8].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert plan.position_ids[0, :8].tolist() == [0, 1, 2, 2, 3, 0, 1, 1]
    allowed = pw.attention_allowed(plan.segment, plan.branch, plan.position_ids, causal=True)[0, 0]
    assert allowed[3].tolist()[:8] == [True, True, False, True, False, False, False, False]  # d sees a b d, not c
    assert allowed[7].tolist()[:8] == [False] * 5 + [True, False, True]  # h sees f h
    assert plan.last_index.tolist() == [2, 4, 6, 7]
    # a third group that does not fit the row: a second row, padded; pads attend only to themselves
    plan = pw.plan(sequences + [[9, 9, 9, 9, 9, 9, 9, 9, 9]], [[0, 1], [2, 3], [4]], pad_token_id=PAD)
    assert plan.input_ids.shape == (2, 9)
    allowed = pw.attention_allowed(plan.segment, plan.branch, plan.position_ids, causal=True)[:, 0]
    pads = (plan.segment < 0).nonzero().tolist()
    assert pads and all(allowed[r, p].sum() == 1 and allowed[r, p, p] for r, p in pads)


def test_flex_block_mask_matches_the_boolean_rule():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    sequences, groups, _ = _groups(3, 2, seed=7)
    plan = pw.plan(sequences, groups, pad_token_id=PAD)
    segment, branch, position = plan.segment, plan.branch, plan.position_ids

    def mask_mod(b, h, q, k):
        same = (segment[b, q] == segment[b, k]) & (segment[b, q] >= 0) & (k <= q)
        same = same & ((branch[b, k] == 0) | (branch[b, k] == branch[b, q]))
        return same | ((segment[b, q] < 0) & (q == k))

    rows, width = segment.shape
    dense = flex.create_mask(mask_mod, rows, 1, width, width, device="cpu")
    assert torch.equal(dense, pw.attention_allowed(segment, branch, position, causal=True))
    assert pw.flex_block_mask(plan, causal=True) is not None


def test_choose_layout_falls_back_with_reasons(caplog):
    model = _model("seqcls", _config("llama"))
    assert layout_check.choose_layout(model, "auto") == "prefix_shared"
    assert layout_check.choose_layout(model, "padded") == "padded"
    # flash-attention takes no custom mask: only the varlen layout is a candidate (not runnable on this CPU)
    assert layout_check._candidates(model.config, "flash_attention_2", "prefix_shared")[0] == ["varlen"]
    model.config._attn_implementation = "some_kernel"
    with caplog.at_level("INFO"):
        assert layout_check.choose_layout(model, "auto") == "padded"
    assert "cannot take a custom 4D mask" in caplog.text
    with pytest.raises(UserError, match="some_kernel"):
        layout_check.choose_layout(model, "prefix_shared")  # forced: an error, never a silent downgrade
    with pytest.raises(ValueError):
        layout_check.choose_layout(model, "fastest")


NEW_FAMILIES = ["gpt_neox", "phi3", "phi3_window", "olmo2", "gemma3", "qwen2_moe", "qwen3_moe", "stablelm", "cohere",
                "cohere2", "mixtral", "gptj", "granite", "smollm3"]


@pytest.mark.parametrize("family", NEW_FAMILIES + FAMILIES)
def test_auto_checks_the_loaded_model_and_picks_prefix_shared(family):
    model = _reward_or_causal(family)
    verdict = layout_check.layout_verdict(model, "auto")
    assert verdict.layout == "prefix_shared", verdict.reason
    assert "checked on this model" in verdict.reason and verdict.max_difference <= 1.0
    assert _equal_to_each_sequence_alone(model, "prefix_shared") < 1e-4


@pytest.mark.parametrize("family", ["falcon", "falcon_alibi", "bloom", "mpt"])
@pytest.mark.parametrize("head", ["seqcls", "causal"])
def test_models_without_position_ids_are_exact_under_every_flag_or_refused(family, head):
    model = _model(head, _config(family))
    for requested in pw.PAIRWISE_FORWARDS:
        try:
            kind = layout_check.choose_layout(model, requested)
        except UserError as error:  # one line naming the model and why
            assert requested in ("prefix_shared", "packed") and "\n" not in str(error)
            assert type(model).__name__ in str(error)
            assert "position_ids" in str(error) or "ALiBi" in str(error)
            continue
        assert _equal_to_each_sequence_alone(model, kind) < 1e-4, (requested, kind)
    assert layout_check.layout_refusal(model) or (family == "falcon" and head == "causal")
    if family == "falcon" and head == "seqcls":
        # the refusal matters: forced past it, the prefix-shared layout gives wrong rewards, without an error (weights
        # drawn wider than the default init so that positions move the result visibly)
        sharp = _model(head, _config(family, initializer_range=0.5))
        assert _equal_to_each_sequence_alone(sharp, "prefix_shared") > 1e-2


def test_falcon_reward_model_is_refused_and_causal_lm_is_checked():
    assert layout_check.layout_refusal(_model("seqcls", _config("falcon"))).startswith("FalconForSequenceClassification.forward")
    assert layout_check.choose_layout(_model("causal", _config("falcon")), "auto") == "prefix_shared"  # rotary, position_ids


def _fresh_cache(monkeypatch):
    """An empty per-process verdict cache for this test only (the model class is changed in place)."""
    monkeypatch.setattr(layout_check, "_CHECKS", {})
    monkeypatch.setattr(layout_check, "_LOGGED", set())


def test_a_model_whose_attention_ignores_the_mask_is_caught(monkeypatch, caplog):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def causal_only(module, query, key, value, attention_mask, **kwargs):  # drops our 4D mask: plain causal attention
        return sdpa_attention_forward(module, query, key, value, None, **{**kwargs, "is_causal": query.shape[2] > 1})

    _fresh_cache(monkeypatch)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", causal_only)
    model = _model("seqcls", _config("llama"))
    assert _equal_to_each_sequence_alone(model, "padded") < 1e-4  # each sequence alone is still right
    with caplog.at_level("INFO", logger="rlhfkit.pairwise"):
        assert layout_check.choose_layout(model, "auto") == "padded"
    assert "prefix_shared differs from each sequence run alone" in caplog.text
    with pytest.raises(UserError, match=r"LlamaForSequenceClassification .*differs from each sequence run alone by"):
        layout_check.choose_layout(model, "prefix_shared")


def test_the_choice_is_checked_once_and_logged_once_per_model(monkeypatch, caplog):
    _fresh_cache(monkeypatch)
    calls = []
    check = layout_check.check_layout
    monkeypatch.setattr(layout_check, "check_layout", lambda model, kind: calls.append(kind) or check(model, kind))
    model = _model("seqcls", _config("qwen2"))
    sequences, groups, _ = _groups(3, 2, seed=21)
    with caplog.at_level("INFO", logger="rlhfkit.pairwise"):
        for _ in range(3):  # scoring, annotation and evaluation call it once per scoring pass
            scoring.score_sequences(model, sequences, PAD, groups=groups)
    assert calls == ["prefix_shared"]
    assert caplog.text.count("pairwise forward: prefix_shared for Qwen2ForSequenceClassification") == 1


def test_varlen_plan_is_one_row_with_restarting_positions():
    sequences = [[1, 2, 3], [4, 5], [6]]
    plan = pw.plan(sequences, kind="varlen", pad_token_id=PAD)
    assert plan.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert plan.position_ids.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert "attention_mask" not in pw.model_inputs(None, plan)


def _conversations(k: int, n_prompts: int, seed: int):
    rng = random.Random(seed)
    words = ["sea", "moon", "kind", "bad", "river", "light", "storm", "good"]
    conversations = []
    for _ in range(n_prompts):
        prompt = [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 30)))}]
        for _ in range(k):
            conversations.append(prompt + [{"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 9)))}])
    rng.shuffle(conversations)  # groups are found by prompt, wherever the responses are
    return conversations


@pytest.mark.parametrize("backbone", ["tiny-random-llama", "tiny-random-bert"])
def test_score_conversations_k_samples_equal_padded(backbone):
    from rlhfkit.builtin_models import materialize
    from rlhfkit.models import ensure_pad_token, load_reward_model, load_tokenizer
    from rlhfkit.scoring import score_conversations

    path = str(materialize(backbone))
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    model = load_reward_model(path, new_head=True).eval()
    ensure_pad_token(tokenizer, model)
    conversations = _conversations(4, 6, seed=8)
    fast = score_conversations(model, tokenizer, conversations, batch_size=8)
    plain = score_conversations(model, tokenizer, conversations, batch_size=8, layout="padded")
    assert fast == pytest.approx(plain, abs=1e-4)


def test_implicit_rewards_equal_padded(tiny_llama_dir):
    from rlhfkit.logprobs import _scores_for, conversation_ids
    from rlhfkit.scoring import prompt_groups
    from rlhfkit.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_llama_dir))
    model = load_causal_lm(str(tiny_llama_dir)).eval()
    conversations = _conversations(3, 5, seed=9)
    encoded = [conversation_ids(tokenizer, c) for c in conversations]
    fast = _scores_for(model, tokenizer, encoded, 4, False, "x", prompt_groups(conversations))
    plain = _scores_for(model, tokenizer, encoded, 4, False, "x", None, layout="padded")
    assert fast == pytest.approx(plain, abs=1e-4)


def test_varlen_layout_is_exact_where_transformers_reads_packed_position_ids():
    # flash-attention gets sequence boundaries from restarting position ids; transformers' SDPA mask builder does the
    # same for a 2D-mask-free batch of one row, so the varlen layout is checked here on CPU through that path
    model = _model("seqcls", _config("llama"))
    sequences, _, _ = _groups(4, 2, seed=10)
    plan = pw.plan(sequences, kind="varlen", pad_token_id=PAD)
    with torch.no_grad():
        assert torch.allclose(pw.sequence_rewards(model, plan), _padded_rewards(model, sequences), atol=1e-4)
