"""rlhfkit.logprobs: hand-computed log-prob sums, response spans, batching invariance, implicit rewards."""

import math

import pytest
import torch

from rlhfkit.errors import UserError
from rlhfkit.logprobs import (
    conversation_ids,
    implicit_reward_margins,
    implicit_rewards,
    response_logprob_sums,
    sequence_logprobs,
    split_conversation,
    shifted_token_logprobs,
)

torch.set_num_threads(1)  # 2 shared cores: oversubscribed threads make tiny models ~50x slower


def _log_softmax(row, index):
    return row[index] - math.log(sum(math.exp(v) for v in row))


def test_token_logprobs_hand_computed():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, 0.5, 3.0], [0.0, 0.0, 0.0]]])  # [1, 3, 3]
    ids = torch.tensor([[2, 1, 2]])
    got = shifted_token_logprobs(logits, ids)
    expected = [0.0, _log_softmax([1.0, 2.0, 0.0], 1), _log_softmax([0.5, 0.5, 3.0], 2)]
    assert got.shape == (1, 3)
    assert got[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_response_logprob_sums_masks_prompt_and_padding():
    logits = torch.tensor(
        [
            [[1.0, 2.0, 0.0], [0.5, 0.5, 3.0], [2.0, 0.0, 1.0], [9.0, 9.0, 9.0]],
            [[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [5.0, -5.0, 0.0], [0.0, 0.0, 0.0]],
        ]
    )
    ids = torch.tensor([[0, 1, 2, 0], [1, 0, 2, 1]])
    mask = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 1]])  # row 0: one response token then padding
    got = response_logprob_sums(logits, ids, mask)
    row0 = _log_softmax([0.5, 0.5, 3.0], 2)
    row1 = _log_softmax([0.0, 1.0, 0.0], 0) + _log_softmax([1.0, 1.0, 1.0], 2) + _log_softmax([5.0, -5.0, 0.0], 1)
    assert got.tolist() == pytest.approx([row0, row1], abs=1e-5)


def test_response_mask_at_position_zero_is_refused():
    with pytest.raises(ValueError, match="position 0"):
        response_logprob_sums(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.tensor([[1, 1]]))


def test_implicit_reward_margins():
    margins = implicit_reward_margins(
        torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -4.0]), torch.tensor([-2.0, -2.0])
    )
    assert margins.tolist() == pytest.approx([(-1 + 2) - (-3 + 2), (-5 + 4) - (-2 + 2)])


def test_split_conversation():
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert split_conversation(conv) == (conv[:1], conv[1:])
    with pytest.raises(UserError, match="does not end with an assistant"):
        split_conversation(conv[:1])
    with pytest.raises(UserError, match="no prompt"):
        split_conversation(conv[1:])


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.builtin_models import materialize

    path = materialize("tiny-random-llama")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), path


CONVERSATIONS = [
    [{"role": "user", "content": "Say something good about the cat"}, {"role": "assistant", "content": "good kind happy"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "tell a story"},
     {"role": "assistant", "content": "once"}, {"role": "user", "content": "more about the sea and the ship"},
     {"role": "assistant", "content": "the sea was warm and bright"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "terrible"}],
]


def test_response_span_is_the_reply_and_its_end_of_turn(tiny):
    _, tokenizer, _ = tiny
    ids, start = conversation_ids(tokenizer, CONVERSATIONS[1])
    assert tokenizer.decode(ids[start:]) == "the sea was warm and bright<|im_end|>\n"
    assert ids.count(tokenizer.bos_token_id) <= 1
    assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")


def test_sequence_logprobs_match_unbatched_reference(tiny):
    model, tokenizer, _ = tiny
    batched = sequence_logprobs(model, tokenizer, CONVERSATIONS, batch_size=2)
    for conv, got in zip(CONVERSATIONS, batched):
        ids, start = conversation_ids(tokenizer, conv)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        expected = sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
        assert got == pytest.approx(expected, abs=1e-4)


def test_implicit_rewards_zero_for_identical_models_and_signed_difference(tiny):
    from transformers import AutoModelForCausalLM

    model, tokenizer, path = tiny
    reference = AutoModelForCausalLM.from_pretrained(path)
    assert implicit_rewards(model, reference, tokenizer, CONVERSATIONS, batch_size=2) == pytest.approx([0, 0, 0], abs=1e-5)

    # a policy whose output bias favours the token ids of "good" must give the first conversation a positive reward
    policy = AutoModelForCausalLM.from_pretrained(path)
    favoured = tokenizer("good kind happy", add_special_tokens=False)["input_ids"]
    bias = torch.zeros(policy.config.vocab_size)
    bias[favoured] = 3.0
    policy.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    rewards = implicit_rewards(policy, reference, tokenizer, CONVERSATIONS, batch_size=3, progress=False)
    assert rewards[0] > 1.0
    assert rewards[2] < 0.0  # "terrible" lost probability mass to the favoured tokens


def test_implicit_rewards_refuses_vocab_mismatch(tiny):
    from transformers import AutoModelForCausalLM

    model, tokenizer, path = tiny
    other = AutoModelForCausalLM.from_pretrained(path)
    other.resize_token_embeddings(model.config.vocab_size + 8)
    with pytest.raises(UserError, match="different vocabularies"):
        implicit_rewards(model, other, tokenizer, CONVERSATIONS[:1])
