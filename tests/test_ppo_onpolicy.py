"""Online RL is on-policy by construction (issue 11.1) and keeps the vocabularies in step (issue 11.2).

- A checkpoint whose generation_config.json sets penalties and suppressed tokens: the sampler ignores them unless
  asked (plain generation asks, RL never does), and then applies them exactly as `model.generate` would.
- PPO's rollout log-probs equal the sampler's; `--suppress_tokens` is applied on both sides; with LoRA dropout the
  first minibatch's ratio is 1.
- A base checkpoint without any pad-like token: PPO, RLOO and GRPO resize the reference and the value model with
  the policy instead of crashing on the first padded batch.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

import ppo_train
from rlhfkit.rl import config, networks, rollout
from rlhfkit.cli import parse_args
from rlhfkit.logits_processors import checkpoint_processor_settings
from rlhfkit.sampling import generate_batch, render_generation_prompt

TYPES = ppo_train.ARGUMENTS
PROMPTS = [[{"role": "user", "content": text}] for text in
           ("tell a story about the sea", "write a poem", "describe a cat", "how do birds fly")]
REWARD_FN = f"{Path(__file__).with_name('test_ppo_train.py')}:positive_words_reward"


def varied_reward(prompts, responses):
    """A reward that differs between any two responses, so the very first update already moves the policy."""
    return [(sum(map(ord, text)) % 101) / 10.0 for text in responses]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def raw_policy(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def frequent_tokens(raw_policy):
    """The 64 tokens the raw policy samples most often (together over a tenth of what it says)."""
    model, tokenizer = raw_policy
    out = generate_batch(model, tokenizer, PROMPTS, n=8, max_new_tokens=16, temperature=1.0, top_p=1.0, seed=0)
    counts = Counter(t for group in out for s in group for t in s["token_ids"] if t not in tokenizer.all_special_ids)
    return [token for token, _ in counts.most_common(64)]


@pytest.fixture(scope="module")
def penalised_checkpoint(tiny_llama_dir, frequent_tokens, tmp_path_factory):
    """tiny-random-llama with a generation_config.json that would change the sampling distribution."""
    from transformers import GenerationConfig

    out = tmp_path_factory.mktemp("penalised") / "model"
    shutil.copytree(tiny_llama_dir, out)
    config = GenerationConfig.from_pretrained(out)
    config.repetition_penalty = 3.0
    config.no_repeat_ngram_size = 2
    config.min_new_tokens = 4
    config.suppress_tokens = frequent_tokens
    config.save_pretrained(out)
    return out


def suppressed_share(samples, tokens) -> float:
    ids = [t for group in samples for s in group for t in s["token_ids"]]
    return sum(t in set(tokens) for t in ids) / len(ids)


def model_logprobs(model, tokenizer, prompt, response_ids) -> torch.Tensor:
    """log softmax(logits) of the response tokens from one plain forward of prompt + response."""
    prompt_ids = render_generation_prompt(tokenizer, prompt)
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(response_ids).unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------------------------
def test_sampler_ignores_the_checkpoint_processors_unless_asked(penalised_checkpoint, frequent_tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(penalised_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(penalised_checkpoint)
    assert set(checkpoint_processor_settings(model)) == {"repetition_penalty", "no_repeat_ngram_size",
                                                         "min_new_tokens", "suppress_tokens"}
    raw = generate_batch(model, tokenizer, PROMPTS, n=4, max_new_tokens=16, temperature=1.0, top_p=1.0, seed=3)
    assert suppressed_share(raw, frequent_tokens) > 0.1  # the raw policy says them often
    # the sampler's log-probs are the model's own: nothing changed the distribution in between
    for prompt, group in zip(PROMPTS, raw):
        for sample in group:
            expected = model_logprobs(model, tokenizer, prompt, sample["token_ids"])
            torch.testing.assert_close(torch.tensor(sample["logprobs"]), expected, atol=1e-4, rtol=0)

    processed = generate_batch(model, tokenizer, PROMPTS, n=4, max_new_tokens=16, temperature=1.0, top_p=1.0,
                               seed=3, checkpoint_processors=True)
    assert suppressed_share(processed, frequent_tokens) == 0.0
    for group in processed:
        for sample in group:
            ids = sample["token_ids"]
            assert len(ids) >= 4  # min_new_tokens
            bigrams = list(zip(ids, ids[1:]))
            assert len(bigrams) == len(set(bigrams))  # no_repeat_ngram_size 2 (within the response)


def test_checkpoint_processors_match_hf_generate(penalised_checkpoint):
    """Greedy with the checkpoint's processors is what `model.generate` returns for the same checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(penalised_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(penalised_checkpoint)
    ours = generate_batch(model, tokenizer, PROMPTS[:2], n=1, max_new_tokens=10, temperature=0.0, top_p=1.0,
                          seed=None, checkpoint_processors=True)
    for prompt, group in zip(PROMPTS[:2], ours):
        ids = torch.tensor([render_generation_prompt(tokenizer, prompt)])
        reference = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=10, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
        expected = reference[0, ids.shape[1]:].tolist()
        assert group[0]["token_ids"] == expected[: len(group[0]["token_ids"])]


# ---------------------------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------------------------
def ppo_run(out_dir, model, *flags, **overrides) -> Path:
    argv = {
        "model_name_or_path": str(model), "output_dir": str(out_dir), "max_steps": "1", "max_new_tokens": "8",
        "rollout_batch_size": "4", "per_device_train_batch_size": "4", "ppo_epochs": "1", "learning_rate": "1e-3",
        "save_strategy": "no", "disable_tqdm": "true", "report_to": "none", "seed": "0", "reward_fn": REWARD_FN,
    }
    argv.update({key: str(value) for key, value in overrides.items()})
    args = [item for key, value in argv.items() for item in (f"--{key}", value)] + list(flags)
    ppo_train.main(*parse_args(TYPES, args))
    return Path(out_dir)


def history(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "log_history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    texts = ["tell a story about the sea", "write a poem", "explain why the sun is warm", "give me a list",
             "describe a cat", "what is math", "how do birds fly", "say something kind"]
    path.write_text("".join(json.dumps({"prompt": text, "id": str(i)}) + "\n" for i, text in enumerate(texts)))
    return str(path)


@pytest.mark.slow  # runs the stage to the end
def test_ppo_rollouts_are_on_policy_from_a_penalised_checkpoint(penalised_checkpoint, frequent_tokens, prompts_file,
                                                                 tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the rollout itself: the suppressed tokens are still sampled (RL optimises the policy, not a heuristic)
    model = AutoModelForCausalLM.from_pretrained(penalised_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(penalised_checkpoint)
    rows = [{"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS)]
    args = config.PPOConfig(output_dir="unused", rollout_batch_size=4, num_samples_per_prompt=4,
                         per_device_train_batch_size=4, max_new_tokens=16)
    batch = rollout.rollout(model, tokenizer, rows, [render_generation_prompt(tokenizer, p) for p in PROMPTS],
                        [0, 1, 2, 3], args, [tokenizer.eos_token_id], "cpu")
    sampled = batch.responses[batch.mask.bool()]
    assert torch.isin(sampled, torch.tensor(frequent_tokens)).float().mean() > 0.1

    # the stage: PPO's log-probs of the rollout equal the sampler's, and run_info says what was ignored
    out = ppo_run(tmp_path / "ppo", penalised_checkpoint, "--dataset_path", prompts_file, num_samples_per_prompt=2,
                  advantage_estimator="rloo")
    row = history(out)[0]
    assert row["rollout/sampler_logprob_gap"] < 1e-4  # 0.47 with the repetition penalty applied by generate
    info = json.loads((out / "run_info.json").read_text())
    assert info["ignored_generation_config"]["repetition_penalty"] == 3.0
    assert info["suppressed_token_ids"] == []

    # asked by flag: the same suppression in the sampler and in the log-probs
    flags = ["--suppress_tokens", *[str(t) for t in frequent_tokens]]
    out = ppo_run(tmp_path / "ppo_suppressed", penalised_checkpoint, "--dataset_path", prompts_file, *flags,
                  num_samples_per_prompt=2, advantage_estimator="rloo")
    assert history(out)[0]["rollout/sampler_logprob_gap"] < 1e-4
    assert json.loads((out / "run_info.json").read_text())["suppressed_token_ids"] == sorted(frequent_tokens)
    batch = rollout.rollout(model, tokenizer, rows, [render_generation_prompt(tokenizer, p) for p in PROMPTS],
                        [0, 1, 2, 3], config.PPOConfig(output_dir="unused", rollout_batch_size=4, num_samples_per_prompt=4,
                                                    per_device_train_batch_size=4, max_new_tokens=16,
                                                    suppress_tokens=[str(t) for t in frequent_tokens]),
                        [tokenizer.eos_token_id], "cpu")
    assert not torch.isin(batch.responses[batch.mask.bool()], torch.tensor(frequent_tokens)).any()


@pytest.mark.slow  # runs the stage to the end
def test_first_minibatch_ratio_is_one_with_lora_dropout(prompts_file, tmp_path):
    out = ppo_run(tmp_path / "dropout", "tiny-random-llama", "--dataset_path", prompts_file, use_peft="true",
                  lora_r=4, lora_alpha=8, lora_dropout=0.5, per_device_train_batch_size=2, ppo_epochs=2,
                  advantage_estimator="gae", gradient_checkpointing="true", max_steps=3, learning_rate=1e-2,
                  reward_fn=f"{__file__}:varied_reward")
    # from step 2 on LoRA's B is no longer 0, so dropout in the update would move the ratio away from 1
    for row in history(out):
        assert row["policy/first_ratio"] == pytest.approx(1.0, abs=1e-5), row["step"]
        assert 0.0 <= row["policy/first_approx_kl"] <= 1e-6, row["step"]
        assert row["rollout/sampler_logprob_gap"] < 1e-4, row["step"]
    assert history(out)[-1]["policy/approx_kl"] > 1e-6  # the policy did move within each step


def test_top_p_below_one_is_refused():
    from rlhfkit.errors import UserError

    with pytest.raises(UserError, match="--top_p must be 1 in PPO"):
        parse_args(TYPES, ["--output_dir", "x", "--dataset_path", "p.jsonl", "--reward_fn", REWARD_FN,
                           "--top_p", "0.9"])


def test_unknown_suppressed_token_is_one_line_error(raw_policy):
    from rlhfkit.errors import UserError

    _, tokenizer = raw_policy
    with pytest.raises(UserError, match="not one token"):
        networks.suppressed_token_ids(tokenizer, ["definitely not a token"])
    assert networks.suppressed_token_ids(tokenizer, ["<|im_start|>", "5"]) == sorted(
        [tokenizer.convert_tokens_to_ids("<|im_start|>"), 5])


# ---------------------------------------------------------------------------------------------------------------
# a checkpoint without a pad token
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def no_pad_checkpoint(tmp_path_factory):
    """A byte-level BPE tokenizer (GPT-2 / Llama-3 base style) with no pad, no unk and no pad-like token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rlhfkit.builtin_models import CHATML_TEMPLATE

    special = ["<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    words = "the sea sun cat bird poem story good kind warm happy math list fly write tell describe".split()
    bpe.train_from_iterator([" ".join(words[i:] + words[:i]) for i in range(len(words))],
                            trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    assert tokenizer.pad_token is None and tokenizer.unk_token is None
    out = tmp_path_factory.mktemp("nopad") / "base"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow  # runs the stage to the end
@pytest.mark.parametrize("estimator", ["gae", "rloo", "grpo"])
def test_no_pad_checkpoint_resizes_reference_and_value_model(no_pad_checkpoint, prompts_file, tmp_path, estimator):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out = ppo_run(tmp_path / estimator, no_pad_checkpoint, "--dataset_path", prompts_file,
                  advantage_estimator=estimator, num_samples_per_prompt=1 if estimator == "gae" else 2,
                  rollout_batch_size=4)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == "<|pad|>" and len(tokenizer) == 301  # one row added ...
    assert AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().num_embeddings == 301
    if estimator == "gae":  # ... to the value model as well (the reference is checked by running at all)
        value = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
        assert value.get_input_embeddings().num_embeddings == 301
    assert all(torch.isfinite(torch.tensor(row["kl/k1"])) for row in history(out))
