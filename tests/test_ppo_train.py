"""ppo_train.py end to end on tiny random models (CPU, no network): learning, reward models, value init, resume."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

import ppo_train
from rlhfkit.rl import ppo, rewards, rollout, scoring
from rlhfkit.args import ModelArguments
from rlhfkit.builtin_models import materialize, train_tiny_tokenizer
from rlhfkit.checkpoints import StageOutput
from rlhfkit.cli import parse_args, run_stage
from rlhfkit.errors import UserError
from rlhfkit.tokenization import DEFAULT_CHAT_TEMPLATE
from tests.conftest import crash_ppo_update_on_call

ROOT = Path(__file__).resolve().parents[1]
TYPES = ppo_train.ARGUMENTS
PROMPTS = [
    "tell a story about the sea", "write a poem", "explain why the sun is warm", "give me a list",
    "describe a cat", "what is math", "how do birds fly", "say something kind",
]


# ---------------------------------------------------------------------------------------------------------------
# reward functions, imported by ppo_train through 'file.py:function'
# ---------------------------------------------------------------------------------------------------------------
POSITIVE_WORDS = set(
    "good great happy kind love wonderful nice joy bright warm helpful honest polite safe thank please yes correct "
    "true friend".split()
)


def positive_words_reward(prompts, responses):
    """Share of the response's words that are in a list of positive words (most are single tokens of the tiny
    tokenizer, so a random policy hits a few percent and can learn to say more of them)."""
    assert len(prompts) == len(responses) and all(p[-1]["role"] == "user" for p in prompts)
    scores = []
    for text in responses:
        words = re.findall(r"[a-z]+", text.lower())
        scores.append(sum(word in POSITIVE_WORDS for word in words) / max(1, len(words)))
    return scores


def wrong_length_reward(prompts, responses):
    return [0.0]


REWARD_FN = f"{__file__}:positive_words_reward"


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ppo")


@pytest.fixture(scope="module")
def prompts_file(workdir):
    path = workdir / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": text, "id": str(i)}) + "\n" for i, text in enumerate(PROMPTS)))
    return str(path)


def save_reward_model(out_dir: Path, tokenizer, reward_stats: dict, seed: int = 0) -> str:
    """A tiny 1-label LlamaForSequenceClassification written through the stage contract, as rm_train.py would."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id, num_labels=1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # visible score differences between responses
    output = StageOutput(out_dir, "rm")
    model.save_pretrained(output.staging, safe_serialization=True)
    tokenizer.save_pretrained(output.staging)
    output.finalize({"reward_stats": reward_stats}, {})
    return str(out_dir)


@pytest.fixture(scope="module")
def same_tokenizer_rm(workdir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(materialize("tiny-random-llama"))
    return save_reward_model(workdir / "rm_same", tokenizer, {"mean": 0.5, "std": 2.0})


@pytest.fixture(scope="module")
def other_tokenizer_rm(workdir):
    tokenizer = train_tiny_tokenizer(vocab_size=300)  # another vocabulary ...
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # ... and a 'User:/Assistant:' template instead of ChatML
    return save_reward_model(workdir / "rm_other", tokenizer, {"mean": -1.0, "std": 0.5}, seed=1)


def run(out_dir, *flags, **overrides) -> Path:
    argv = {
        "model_name_or_path": "tiny-random-llama", "output_dir": str(out_dir), "max_steps": "2",
        "max_new_tokens": "8", "rollout_batch_size": "4", "per_device_train_batch_size": "4", "ppo_epochs": "1",
        "learning_rate": "1e-3", "lr_scheduler_type": "constant", "save_strategy": "no", "disable_tqdm": "true",
        "report_to": "none", "seed": "0",
    }
    argv.update({key: str(value) for key, value in overrides.items()})
    args = [item for key, value in argv.items() for item in (f"--{key}", value)] + list(flags)
    metrics = ppo_train.main(*parse_args(TYPES, args))
    assert metrics["steps"] == int(argv["max_steps"])  # main returns its metrics; the stage's dir is out_dir
    return Path(out_dir)


def history(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "log_history.jsonl").read_text().splitlines()]


def mean(rows, key) -> float:
    return sum(row[key] for row in rows) / len(rows)


# ---------------------------------------------------------------------------------------------------------------
# learning
# ---------------------------------------------------------------------------------------------------------------
# 32 responses of 16 tokens per step; the rise comes after ~20 steps (3 seeds tried each: all rose 4-15×)
LEARN = dict(max_steps=30, max_new_tokens=16, per_device_train_batch_size=16, ppo_epochs=4, seed=1)


@pytest.mark.slow  # runs the stage to the end
def test_ppo_gae_raises_reward_with_bounded_kl(workdir, prompts_file):
    out = run(workdir / "ppo_gae", "--dataset_path", prompts_file, reward_fn=REWARD_FN, rollout_batch_size=32,
              learning_rate=3e-3, kl_coef=0.01, **LEARN)
    rows = history(out)
    assert [row["step"] for row in rows] == list(range(1, 31))
    start, end = mean(rows[:5], "reward/raw"), mean(rows[-5:], "reward/raw")
    assert end > max(3 * start, start + 0.08), f"reward {start:.3f} → {end:.3f}"
    assert max(row["kl/k1"] for row in rows) < 60.0
    # every metric the stage promises, every step
    for key in ("reward/raw", "reward/normalized", "kl/k1", "kl/k3", "kl/coef", "policy/entropy", "policy/clipfrac",
                "policy/approx_kl", "value/loss", "value/clipfrac", "value/explained_variance", "response/length",
                "response/eos_fraction", "time/generation_s", "time/training_s", "time/generation_share"):
        assert all(math.isfinite(row[key]) for row in rows), key
    # the stage contract: policy + tokenizer at the top, the value model beside it
    info = json.loads((out / "run_info.json").read_text())
    assert info["complete"] and info["stage"] == "ppo" and info["value_model"]["init"] == "policy"
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(out)
    value = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert value.config.num_labels == 1
    assert not (out / "checkpoints").exists() and not Path(f"{out}.partial").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reward_raw_last"] > metrics["reward_raw_first"]


@pytest.mark.slow  # runs the stage to the end
def test_rloo_raises_reward_without_a_value_model(workdir, prompts_file):
    out = run(workdir / "rloo", "--dataset_path", prompts_file, reward_fn=REWARD_FN, advantage_estimator="rloo",
              rollout_batch_size=8, num_samples_per_prompt=4, learning_rate=3e-3, kl_coef=0.01, **LEARN)
    rows = history(out)
    start, end = mean(rows[:5], "reward/raw"), mean(rows[-5:], "reward/raw")
    assert end > max(3 * start, start + 0.08), f"reward {start:.3f} → {end:.3f}"
    assert max(row["kl/k1"] for row in rows) < 60.0
    assert "value/loss" not in rows[0]
    assert not (out / "value_model").exists()


@pytest.mark.slow  # runs the stage to the end
@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
def test_other_critic_free_estimators_run(workdir, prompts_file, estimator):
    out = run(workdir / estimator, "--dataset_path", prompts_file, reward_fn=REWARD_FN,
              advantage_estimator=estimator, num_samples_per_prompt=2, rollout_batch_size=2, kl_loss_coef=0.1,
              kl_estimator="k3", missing_eos_penalty=1.0, reward_clip=5.0)
    rows = history(out)
    assert len(rows) == 2 and all(math.isfinite(row["policy/kl_loss"]) for row in rows)
    info = json.loads((out / "run_info.json").read_text())
    assert info["pairwise_forward"] == {"policy": "prefix_shared", "reference": "prefix_shared"}
    if estimator == "grpo":  # the same run through padded rows: the same losses, KL and weights
        padded = run(workdir / "grpo_padded", "--dataset_path", prompts_file, reward_fn=REWARD_FN,
                     advantage_estimator=estimator, num_samples_per_prompt=2, rollout_batch_size=2, kl_loss_coef=0.1,
                     kl_estimator="k3", missing_eos_penalty=1.0, reward_clip=5.0, pairwise_forward="padded")
        for shared_row, padded_row in zip(rows, history(padded)):
            for key in ("policy/pg_loss", "policy/kl_loss", "policy/entropy", "kl/k1", "reward/raw"):
                assert shared_row[key] == pytest.approx(padded_row[key], abs=1e-5), key
        from safetensors.torch import load_file

        ours, theirs = load_file(out / "model.safetensors"), load_file(padded / "model.safetensors")
        assert max((ours[name] - theirs[name]).abs().max().item() for name in ours) < 1e-5


def test_rollout_layout_and_reward_position(monkeypatch):
    """Left-padded prompts, responses cut after the first stop token, the score on that token (or the last one)."""
    from transformers import AutoTokenizer

    import rlhfkit.sampling

    tokenizer = AutoTokenizer.from_pretrained(materialize("tiny-random-llama"))
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id

    def fake_generate_batch(model, tokenizer, prompts, n, **kwargs):
        return [[{"text": "a b", "token_ids": [10, 11, eos], "finished": True}],
                [{"text": "c d e f", "token_ids": [12, 13, 14, 15], "finished": False}]]

    monkeypatch.setattr(rlhfkit.sampling, "generate_batch", fake_generate_batch)
    rows = [{"id": str(i), "prompt": [{"role": "user", "content": text}]} for i, text in enumerate("xy")]
    args = ppo_train.PPOConfig(output_dir="unused", rollout_batch_size=2, per_device_train_batch_size=2,
                               max_new_tokens=4)
    batch = rollout.rollout(None, tokenizer, rows, [[1, 2, 3], [4, 5]], [0, 1], args, [eos], "cpu")
    assert batch.input_ids.tolist() == [[1, 2, 3, 10, 11, eos, pad], [pad, 4, 5, 12, 13, 14, 15]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]]
    assert batch.position_ids[1, 1:].tolist() == [0, 1, 2, 3, 4, 5]  # positions skip the left padding
    assert batch.mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch.has_stop.tolist() == [True, False]
    assert batch.texts == ["a b", "c d e f"]

    args = ppo_train.PPOConfig(output_dir="unused", rollout_batch_size=2, per_device_train_batch_size=2,
                               whiten_advantages=False, gamma=1.0, lam=1.0)
    values = torch.zeros(2, 4)
    scores, kl = torch.tensor([2.0, 3.0]), torch.zeros(2, 4)
    _, returns = ppo.step_advantages(args, scores, kl, batch.mask, values, kl_coef=0.1)
    # γ = λ = 1 and V = 0: every token's return is the score; nothing after the EOS (a reward one token late
    # would be masked away and give 0 here)
    assert returns.tolist() == [[2.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0]]


# ---------------------------------------------------------------------------------------------------------------
# reward models and the value model
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # runs the stage to the end
def test_value_model_starts_from_the_reward_model(workdir, prompts_file, same_tokenizer_rm):
    from safetensors.torch import load_file

    # value learning rate 0: the saved value model must be the RM itself, which proves where it started
    out = run(workdir / "value_from_rm", "--dataset_path", prompts_file, reward_model_path=same_tokenizer_rm,
              value_learning_rate=0.0, weight_decay=0.0, report_to="tensorboard")
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # report_to reaches accelerate's tracker
    info = json.loads((out / "run_info.json").read_text())
    assert info["value_model"]["init"] == "reward_model"
    assert info["reward_normalization"] == "rm_stats"
    assert info["reward"][0]["reward_stats"] == {"mean": 0.5, "std": 2.0}
    rows = history(out)
    # normalised = (raw − 0.5) / 2 with no penalty or clip configured
    for row in rows:
        assert row["reward/normalized"] == pytest.approx((row["reward/raw"] - 0.5) / 2.0, abs=1e-5)
    saved = load_file(out / "value_model" / "model.safetensors")
    original = load_file(Path(same_tokenizer_rm) / "model.safetensors")
    assert saved.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(saved[key], original[key])


def test_reward_model_with_another_tokenizer_scores_the_rerendered_conversation(workdir, other_tokenizer_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = rewards.ModelReward(other_tokenizer_rm, ModelArguments(model_name_or_path="unused"))
    prompts = [[{"role": "user", "content": "describe a cat"}], [{"role": "user", "content": "write a poem"}]]
    responses = ["a warm happy cat", "the sea is dark"]
    scores = reward(prompts, responses)

    tokenizer = AutoTokenizer.from_pretrained(other_tokenizer_rm)
    model = AutoModelForSequenceClassification.from_pretrained(other_tokenizer_rm).eval()
    for prompt, response, score in zip(prompts, responses, scores):
        ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=True,
                                            return_dict=True)["input_ids"]
        assert "Assistant: " + response in tokenizer.decode(ids)  # the RM's template, not the policy's ChatML
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)
    assert scores[0] != pytest.approx(scores[1])


@pytest.mark.slow  # runs the stage to the end
def test_ppo_with_a_reward_model_of_another_tokenizer(workdir, prompts_file, other_tokenizer_rm):
    with pytest.raises(UserError, match="share the policy's tokenizer"):
        run(workdir / "bad_value", "--dataset_path", prompts_file, reward_model_path=other_tokenizer_rm,
            value_model_init="reward_model")
    out = run(workdir / "other_rm", "--dataset_path", prompts_file, reward_model_path=other_tokenizer_rm,
              missing_eos_penalty=1.0)
    info = json.loads((out / "run_info.json").read_text())
    assert info["value_model"]["init"] == "policy"  # auto: the RM cannot read the policy's tokens
    assert info["reward_normalization"] == "rm_stats"
    rows = history(out)
    for row in rows:  # (raw + 1) / 0.5, minus 1 for each response cut at max_new_tokens
        expected = (row["reward/raw"] + 1.0) / 0.5 - (1.0 - row["response/eos_fraction"])
        assert row["reward/normalized"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow  # runs the stage to the end
def test_lora_policy_and_value_with_gradient_checkpointing(workdir, prompts_file, same_tokenizer_rm):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = run(workdir / "lora", "--dataset_path", prompts_file, reward_model_path=same_tokenizer_rm, use_peft="true",
              lora_r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing="true")
    info = json.loads((out / "run_info.json").read_text())
    assert info["reference_model"] == "policy with LoRA disabled"  # no second copy of the weights
    assert info["value_model"]["init"] == "reward_model"
    assert not (out / "adapter_model.safetensors").exists()  # merged into plain weights
    policy = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(materialize("tiny-random-llama"))
    changed = [name for name, p in policy.named_parameters() if not torch.equal(p, base.state_dict()[name])]
    assert changed and all("proj" in name for name in changed)  # LoRA targets (all-linear) moved, nothing else
    AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    rows = history(out)
    assert rows[0]["kl/k1"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference exactly
    # args.yaml reruns the same configuration
    script_args, model_args, training_args = parse_args(TYPES, ["--config", str(out / "args.yaml")])
    assert model_args.use_peft and training_args.gradient_checkpointing
    assert script_args.reward_model_path == [same_tokenizer_rm]


# ---------------------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # runs the stage to the end
def test_resume_after_a_crash_continues_from_the_saved_step(workdir, prompts_file, monkeypatch):
    from safetensors.torch import load_file

    flags = dict(max_steps=4, save_steps=2, save_strategy="steps", kl_target=1.0, kl_horizon=50)
    reference = run(workdir / "uninterrupted", "--dataset_path", prompts_file, reward_fn=REWARD_FN, **flags)

    real_update = crash_ppo_update_on_call(monkeypatch, 3)
    out = workdir / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(out, "--dataset_path", prompts_file, reward_fn=REWARD_FN, **flags)
    partial = Path(f"{out}.partial")
    assert sorted(p.name for p in (partial / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert not out.exists()
    with pytest.raises(UserError, match="resume_from_checkpoint"):  # a plain rerun must not silently start over
        run(out, "--dataset_path", prompts_file, reward_fn=REWARD_FN, **flags)

    monkeypatch.setattr(ppo, "ppo_update", real_update)
    run(out, "--dataset_path", prompts_file, reward_fn=REWARD_FN, resume_from_checkpoint="true", **flags)
    resumed_rows, reference_rows = history(out), history(reference)
    assert [row["step"] for row in resumed_rows] == [1, 2, 3, 4]
    for got, want in zip(resumed_rows, reference_rows):  # same samples, same updates, same KL coefficient
        for key in want:
            if not key.startswith("time/"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (got["step"], key)
    assert reference_rows[-1]["kl/coef"] != reference_rows[0]["kl/coef"]  # the adaptive state really moved
    got, want = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
    info = json.loads((out / "run_info.json").read_text())
    ref_info = json.loads((reference / "run_info.json").read_text())
    assert info["kl_controller"]["value"] == pytest.approx(ref_info["kl_controller"]["value"])


@pytest.mark.slow
def test_sigkill_then_resume_from_the_command_line(workdir, prompts_file):
    """The real thing: kill -9 the process after a checkpoint, rerun with --resume_from_checkpoint true."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = workdir / "killed"
    base = [sys.executable, str(ROOT / "ppo_train.py"), "--model_name_or_path", "tiny-random-llama",
            "--dataset_path", prompts_file, "--reward_fn", REWARD_FN, "--output_dir", str(out),
            "--rollout_batch_size", "4", "--per_device_train_batch_size", "4", "--max_new_tokens", "8",
            "--ppo_epochs", "1", "--learning_rate", "1e-3", "--save_steps", "2", "--save_total_limit", "1",
            "--disable_tqdm", "true", "--report_to", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    checkpoints = Path(f"{out}.partial") / "checkpoints"
    process = subprocess.Popen(base + ["--max_steps", "100000"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(checkpoints.glob("checkpoint-*")):
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    saved = [int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*")]
    assert saved, "no checkpoint written before the kill"
    last = max(saved)
    # a shorter run changes the result (the schedule's length): refused unless asked for on purpose, then recorded
    resumed = subprocess.run(base + ["--max_steps", str(last + 2), "--resume_from_checkpoint", "true",
                                     "--allow_changed_args", "max_steps"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "max_steps" in json.dumps(json.loads((out / "run_info.json").read_text())["history"])
    assert f"at step {last}" in resumed.stderr
    assert [row["step"] for row in history(out)] == list(range(1, last + 3))


# ---------------------------------------------------------------------------------------------------------------
# command line and errors
# ---------------------------------------------------------------------------------------------------------------
def test_help_lists_the_ppo_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_stage(ppo_train.main, TYPES, ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--advantage_estimator", "--kl_estimator", "--missing_eos_penalty", "--reward_fn",
                 "--value_model_init", "--use_peft", "--resume_from_checkpoint", "--reward_weights",
                 "--loss_aggregation", "--importance_sampling_level", "--policy_loss", "--cliprange_high",
                 "--mask_truncated_completions", "--dynamic_sampling", "--overlong_penalty", "--eval_dataset_path",
                 "arXiv 2503.14476", "arXiv 2507.18071"):
        assert flag in text


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "recipes" / "ppo").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_parse(recipe):
    argv = ["--config", str(recipe), "--bf16", "false"]  # bf16 is for GPUs; the rest must parse as written
    if "reward_model_path" not in recipe.read_text():
        argv += ["--reward_fn", REWARD_FN]
    script_args, _, training_args = parse_args(TYPES, argv)
    assert script_args.dataset_path and training_args.output_dir


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "at least one reward source"),
        (["--reward_fn", REWARD_FN, "--reward_fn", "format", "--reward_weights", "1"], "1 weights for 2 reward"),
        (["--reward_fn", REWARD_FN, "--loss_aggregation", "dapo"], "--loss_aggregation must be one of token"),
        (["--reward_fn", REWARD_FN, "--importance_sampling_level", "seq"], "importance_sampling_level"),
        (["--reward_fn", REWARD_FN, "--policy_loss", "sapo"], "--policy_loss must be one of ppo, cispo"),
        (["--reward_fn", REWARD_FN, "--dynamic_sampling", "true"], "use --advantage_estimator grpo or rloo"),
        (["--reward_fn", REWARD_FN, "--advantage_estimator", "grpo"], "num_samples_per_prompt"),
        (["--reward_fn", REWARD_FN, "--kl_estimator", "k7"], "kl_estimator"),
        (["--reward_fn", REWARD_FN, "--rollout_batch_size", "3", "--per_device_train_batch_size", "2"], "minibatches"),
        (["--reward_fn", REWARD_FN, "--vllm_importance_sampling_correction", "true"], "needs --use_vllm true"),
    ],
)
def test_bad_flags_are_one_line_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_args(TYPES, ["--output_dir", "x", "--dataset_path", "p.jsonl", *argv])


def test_bad_reward_functions(workdir, prompts_file):
    with pytest.raises(UserError, match="has no attribute 'nope'"):
        run(workdir / "bad1", "--dataset_path", prompts_file, reward_fn=f"{__file__}:nope")
    with pytest.raises(UserError, match="cannot import"):
        run(workdir / "bad2", "--dataset_path", prompts_file, reward_fn="no_such_module_xyz:f")
    with pytest.raises(UserError, match="returned 1 scores for 4 responses"):
        run(workdir / "bad3", "--dataset_path", prompts_file, reward_fn=f"{__file__}:wrong_length_reward")


def test_prompt_order_is_a_function_of_the_step():
    first_pass = [i for step in range(3) for i in rollout.prompt_positions(step, 4, 12, seed=7)]
    assert sorted(first_pass) == list(range(12))  # one pass visits every prompt once
    assert rollout.prompt_positions(5, 4, 12, seed=7) == rollout.prompt_positions(5, 4, 12, seed=7)
    assert rollout.prompt_positions(3, 4, 12, seed=7) != rollout.prompt_positions(0, 4, 12, seed=7)
    assert len(rollout.prompt_positions(0, 5, 3, seed=0)) == 5  # fewer prompts than a step needs: wraps


_CALLS = {"n": 0}


def preempting_reward(prompts, responses):
    """positive_words_reward, and a SIGTERM to this very process on the 3rd call (step 3's scoring), as a cluster's
    preemption would send it mid-step."""
    import os
    import signal

    _CALLS["n"] += 1
    if _CALLS["n"] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return positive_words_reward(prompts, responses)


@pytest.mark.slow  # runs the stage to the end
def test_sigterm_checkpoints_the_step_and_resumes_to_the_same_weights(workdir, prompts_file, capsys):
    from safetensors.torch import load_file

    from rlhfkit.faults import Preempted

    common = {"dataset_path": prompts_file, "max_steps": "5", "save_strategy": "steps", "save_steps": "100"}
    straight = run(workdir / "straight", reward_fn=REWARD_FN, **common)
    out = workdir / "preempted"
    _CALLS["n"] = 0
    with pytest.raises(Preempted):
        run(out, reward_fn=f"{__file__}:preempting_reward", **common)
    err = capsys.readouterr().err
    line = [text for text in err.splitlines() if text.startswith("preempted:")]
    assert len(line) == 1 and "at step 3: checkpoint saved to" in line[0], err[-2000:]
    checkpoints = Path(f"{out}.partial") / "checkpoints"
    assert (checkpoints / "checkpoint-3").is_dir() and not out.exists()
    # the preempting reward differs from the plain one only by the signal it sends: allowed on purpose
    run(out, "--resume_from_checkpoint", "true", "--allow_changed_args", "reward_fn", reward_fn=REWARD_FN, **common)
    assert [row["step"] for row in history(out)] == [1, 2, 3, 4, 5]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# the GRPO family: verifiable and several rewards, dynamic sampling, overlong shaping, held-out evaluation
# ---------------------------------------------------------------------------------------------------------------
def digit_reward(prompts, responses):
    """Varied scores from a random policy: the share of characters that are digits."""
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in responses]


@pytest.mark.slow
def test_grpo_family_run_logs_every_component_and_evaluates_held_out(workdir):
    from rlhfkit.rl.tasks import make_problems

    train = workdir / "add_train.jsonl"
    heldout = workdir / "add_heldout.jsonl"
    rows = make_problems("add", 24, seed=1)
    train.write_text("".join(json.dumps(row) + "\n" for row in rows[:16]))
    heldout.write_text("".join(json.dumps(row) + "\n" for row in rows[16:]))
    out = run(workdir / "grpo_family", "--dataset_path", str(train), "--eval_dataset_path", str(heldout),
              "--reward_fn", "exact_answer", "--reward_fn", f"{__file__}:digit_reward", "--reward_fn", "format",
              "--reward_weights", "1", "0.5", "0.2", advantage_estimator="grpo", num_samples_per_prompt=4,
              rollout_batch_size=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
              dynamic_sampling="true", dynamic_sampling_max_batches=3, overlong_penalty="true",
              overlong_buffer_length=4, mask_truncated_completions="true", loss_aggregation="token",
              importance_sampling_level="sequence", cliprange_high=0.28, kl_loss_coef=0.01)
    rows = history(out)
    for row in rows:
        for key in ("reward/exact_answer", "reward/digit_reward", "reward/format", "reward/overlong",
                    "sampling/generation_batches", "sampling/informative_groups", "sampling/filled_groups",
                    "policy/clipfrac_high", "policy/kl_loss"):
            assert key in row, key
        assert row["reward/raw"] == pytest.approx(
            row["reward/exact_answer"] + 0.5 * row["reward/digit_reward"] + 0.2 * row["reward/format"], abs=1e-5)
        assert 1 <= row["sampling/generation_batches"] <= 3
        assert row["sampling/informative_groups"] + row["sampling/filled_groups"] >= 2
        assert row["policy/first_ratio"] == pytest.approx(1.0, abs=1e-5)  # still on-policy
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("reward", "exact_answer", "digit_reward", "format"):
        assert set(metrics["eval"][key]) == {"before", "after", "delta"}
        assert metrics["eval"][key]["after"]["n"] == 8
    after = [json.loads(line) for line in (out / "eval_after.jsonl").read_text().splitlines()]
    assert [r["id"] for r in after] == [f"add-1-{i}" for i in range(16, 24)]
    info = json.loads((out / "run_info.json").read_text())
    assert [entry["key"] for entry in info["reward"]] == ["exact_answer", "digit_reward", "format"]


def test_exact_answer_needs_the_answer_column(workdir, prompts_file):
    with pytest.raises(UserError, match=r"row 1 \(id '.*'\): field 'answer': missing"):
        run(workdir / "no_answer", "--dataset_path", prompts_file, reward_fn="exact_answer")
    assert not (workdir / "no_answer").exists()


def test_dynamic_sampling_draws_fresh_prompts_and_concatenates_rollouts():
    used = set(rollout.prompt_positions(3, 4, 10, seed=0))
    extra = scoring.draw_positions(3, 1, 4, 10, 0, used)
    assert not used & set(extra) and extra == scoring.draw_positions(3, 1, 4, 10, 0, used)
    assert scoring.draw_positions(3, 0, 4, 10, 0, set()) == rollout.prompt_positions(3, 4, 10, seed=0)

    def make_rollout(prompt_len, width, fill):
        responses = torch.full((2, width), fill)
        mask = torch.ones(2, width)
        mask[1, -1] = 0
        attention = torch.cat([torch.ones(2, prompt_len, dtype=torch.long), mask.long()], dim=1)
        return rollout.Rollout(prompts=[[{"role": "user", "content": str(fill)}]] * 2, texts=[str(fill)] * 2,
                               input_ids=torch.cat([torch.full((2, prompt_len), 7), responses], dim=1),
                               attention_mask=attention, position_ids=rollout.positions_from_mask(attention),
                               responses=responses, mask=mask, has_stop=torch.tensor([True, False]),
                               sample_logprobs=-mask)

    merged = rollout.concat_rollouts([make_rollout(3, 2, 5), make_rollout(1, 4, 6)], [(1, 0), (0, 1)], pad_id=0)
    assert merged.input_ids.tolist() == [[0, 0, 7, 6, 6, 6, 6], [7, 7, 7, 5, 5, 0, 0]]  # prompts left, responses right
    assert merged.mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert merged.position_ids[0].tolist()[2:] == [0, 1, 2, 3, 4] and merged.has_stop.tolist() == [True, False]
    assert merged.texts == ["6", "5"]


# ---------------------------------------------------------------------------------------------------------------
# the prefix-shared log-prob forward (--pairwise_forward) equals the padded one
# ---------------------------------------------------------------------------------------------------------------
def _grouped_rollout(tokenizer, k=3):
    """Two prompts × k samples of different lengths, one without a stop token, laid out as `rollout.rollout` does."""
    from rlhfkit.sampling import build_prompt_batch

    eos = tokenizer.eos_token_id
    prompts = [[5, 9, 13, 21, 7, 30], [5, 9, 40]]
    responses = [[11, 12, eos], [11, 17, 18, 19, eos], [22, 23, 24, 25, 26, 27], [31, eos], [32, 33, eos], [31, 34]]
    width = max(len(r) for r in responses)
    query = build_prompt_batch([p for p in prompts for _ in range(k)], pad_id=0)
    padded = torch.zeros(len(responses), width, dtype=torch.long)
    mask = torch.zeros(len(responses), width)
    for row, tokens in enumerate(responses):
        padded[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    attention = torch.cat([query["attention_mask"], mask.long()], dim=1)
    return rollout.Rollout(
        prompts=[[{"role": "user", "content": str(i)}] for i in range(2) for _ in range(k)], texts=[""] * 6,
        input_ids=torch.cat([query["input_ids"], padded], dim=1), attention_mask=attention,
        position_ids=rollout.positions_from_mask(attention), responses=padded, mask=mask,
        has_stop=torch.tensor([True, True, False, True, True, False]), sample_logprobs=torch.zeros_like(mask))


def test_prefix_shared_ppo_forward_equals_padded_with_grad_entropy_suppression_and_lora(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.layout_check import choose_layout
    from rlhfkit.rl import networks

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    policy = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model = networks.PolicyAndValue(policy, None, suppressed_tokens=[3, 4])
    batch = _grouped_rollout(tokenizer)
    plan = rollout.response_plan(batch, slice(0, 6), "prefix_shared")
    assert plan.computed_tokens < int(batch.attention_mask.sum())  # each prompt computed once for its 3 samples
    assert choose_layout(policy, "auto") == "prefix_shared"
    mask = batch.mask
    results = {}
    for layout in ("padded", "prefix_shared"):
        model.zero_grad()
        rows = torch.tensor([4, 0, 2, 1, 5, 3])  # a shuffled minibatch, as ppo_update takes them
        logprobs, entropy, _ = rollout.policy_forward(model, batch, rows, 0.7, layout, entropy=True)
        ((logprobs * mask[rows]).sum() + (entropy * mask[rows]).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            reference = rollout.reference_logprobs(None, policy, batch, 4, 0.7, [3, 4], layout)
        results[layout] = (logprobs.detach() * mask[rows], entropy.detach() * mask[rows], grads, reference * mask)
    for padded, shared in zip(results["padded"][:2], results["prefix_shared"][:2]):
        torch.testing.assert_close(shared, padded, atol=1e-5, rtol=1e-5)
    assert results["padded"][2].keys() == results["prefix_shared"][2].keys() and results["padded"][2]
    for name, grad in results["padded"][2].items():
        torch.testing.assert_close(results["prefix_shared"][2][name], grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results["prefix_shared"][3], results["padded"][3], atol=1e-5, rtol=1e-5)
    # the suppression took effect (the same forward without it gives other log-probs), and entropies are finite
    with torch.no_grad():
        unsuppressed = rollout.reference_logprobs(None, policy, batch, 4, 0.7, [], "prefix_shared") * mask
    assert (unsuppressed - results["prefix_shared"][3]).abs().max() > 1e-4
    assert torch.isfinite(results["prefix_shared"][1]).all() and torch.isfinite(results["padded"][1]).all()
