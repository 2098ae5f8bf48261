"""MORE (rlhfkit/train/more.py): min-norm solver against closed form and brute force, momentum and normalisation by hand,
reward-head gradients against autograd on a real HF model (full and LoRA), the per-source sampler, MORE beating
the multitask baseline on the worst source of a synthetic mixture, and `rm_train.py --objective more|multitask`."""

import ast
import json
import math
import random
import shutil

import pytest
import torch
from torch import nn

from rlhfkit.errors import UserError
from rlhfkit.train.more import (
    MoreWeighting,
    SourceWeightedLoss,
    capture_reward_head,
    head_gradients,
    loss_weights,
    min_norm_two,
    min_norm_weights,
    normalize_gradients,
    per_source_losses,
    reference_min_norm_two,
    reference_min_norm_weights,
    reward_gradients,
)
from rlhfkit.train.more_trainer import MoreRewardTrainer, MultitaskRewardTrainer, SourceBalancedBatchSampler, trainer_class

torch.set_num_threads(1)  # 2 shared cores: oversubscribed threads make tiny models ~10x slower


# ---------------------------------------------------------------------------------------------------------------
# solver
# ---------------------------------------------------------------------------------------------------------------
def _objective(weights, vectors):
    combined = (weights.double()[:, None] * vectors.double()).sum(0)
    return float(combined @ combined)


def test_two_sources_hand_computed():
    # x1 = [1, 0], x2 = [-1, 1]: γ* = (v22 − v12) / (v11 − 2 v12 + v22) = (2 + 1) / (1 + 2 + 2) = 0.6
    weights = min_norm_weights(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
    assert weights.tolist() == pytest.approx([0.6, 0.4])
    assert _objective(weights, torch.tensor([[1.0, 0.0], [-1.0, 1.0]])) == pytest.approx(0.2)  # ‖[0.2, 0.4]‖²
    # orthogonal unit vectors: the midpoint
    assert min_norm_weights(torch.eye(2)).tolist() == pytest.approx([0.5, 0.5])
    # x2 = 2·x1: the min-norm point is x1 itself (γ clipped to 1), not the reference's 0.999
    assert min_norm_weights(torch.tensor([[1.0, 0.0], [2.0, 0.0]])).tolist() == pytest.approx([1.0, 0.0])
    assert min_norm_two(1.0, 1.0, 1.0)[0] == 0.5  # identical vectors: any γ; we pick ½


@pytest.mark.parametrize("seed", range(8))
def test_two_sources_match_closed_form(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, generator=generator, dtype=torch.float64)
    if seed % 2:  # make them conflict
        x[1] = -0.3 * x[0] + 0.2 * x[1]
    v11, v12, v22 = float(x[0] @ x[0]), float(x[0] @ x[1]), float(x[1] @ x[1])
    gamma = min(1.0, max(0.0, (v22 - v12) / (v11 - 2 * v12 + v22)))
    assert min_norm_weights(x).tolist() == pytest.approx([gamma, 1 - gamma], abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_three_sources_match_brute_force(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    if seed == 1:
        x[2] = -0.5 * x[0] + 0.01 * x[2]  # two nearly opposite sources
    if seed == 2:
        x[1] = 3 * x[0]  # a vertex/edge solution
    weights = min_norm_weights(x)
    assert weights.sum().item() == pytest.approx(1.0) and (weights >= 0).all()
    # grid over the simplex with step 1/n, then a finer grid around the best grid point
    gram = x @ x.T

    def best_of(points):
        values = ((points @ gram) * points).sum(1)
        best = int(values.argmin())
        return float(values[best]), points[best]

    n = 200
    coarse = torch.tensor([(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)],
                          dtype=torch.float64)
    _, (a0, b0, _) = best_of(coarse)
    steps = torch.arange(-20, 21, dtype=torch.float64) / (20 * n)
    a, b = torch.meshgrid(a0 + steps, b0 + steps, indexing="ij")
    fine = torch.stack([a.flatten(), b.flatten(), 1 - a.flatten() - b.flatten()], 1)
    fine = fine[(fine >= 0).all(1)]
    brute_value, brute_weights = best_of(fine)
    ours = _objective(weights, x)
    assert ours <= brute_value + 1e-6 * max(1.0, brute_value)
    assert ours >= brute_value - 1e-3 * max(1e-3, brute_value)  # brute force is within 1/(20n) of the optimum
    if seed != 2:  # a unique optimum: the weights themselves agree
        assert weights.tolist() == pytest.approx(brute_weights.tolist(), abs=2e-3)


def test_more_than_three_sources_is_a_minimum():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    weights = min_norm_weights(x)
    value = _objective(weights, x)
    # KKT: every source's inner product with the min-norm point is ≥ its norm², with equality where λ_k > 0
    point = (weights[:, None] * x).sum(0)
    inner = x @ point
    assert (inner >= value - 1e-7).all()
    assert torch.allclose(inner[weights > 1e-6], torch.full_like(inner[weights > 1e-6], value), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# normalisation, loss weights, momentum
# ---------------------------------------------------------------------------------------------------------------
def test_l2_normalisation_and_loss_weights_by_hand():
    grads = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    normalised, divisors = normalize_gradients(grads, "l2")
    assert divisors.tolist() == [5.0, 2.0]
    assert normalised.flatten().tolist() == pytest.approx([0.6, 0.8, 0.0, 1.0])
    same, ones = normalize_gradients(grads, "none")
    assert torch.equal(same, grads) and ones.tolist() == [1.0, 1.0]
    zero, div = normalize_gradients(torch.zeros(1, 3), "l2")
    assert torch.equal(zero, torch.zeros(1, 3)) and div.tolist() == [1.0]
    # two unit vectors: λ = [½, ½]; loss weights ∝ λ_k / ‖g_k‖ = [0.1, 0.25] → [2/7, 5/7]
    weights = loss_weights(min_norm_weights(normalised), divisors.double())
    assert weights.tolist() == pytest.approx([2 / 7, 5 / 7])
    # the combined raw gradient points along the min-norm element of the normalised gradients
    combined = (weights.float()[:, None] * grads).sum(0)
    direction = 0.5 * normalised[0] + 0.5 * normalised[1]
    assert torch.allclose(combined / combined.norm(), direction / direction.norm(), atol=1e-6)


def test_momentum_weights_the_current_gradient_by_alpha():
    weighting = MoreWeighting(2, alpha=0.25, normalize="none")
    weighting.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), [0, 1])
    assert weighting.momentum[0].tolist() == [1.0, 0.0]  # first step: the gradient itself
    weighting.update(torch.tensor([[0.0, 4.0]]), [1])  # source 0 absent: its momentum is kept
    assert weighting.momentum[0].tolist() == [1.0, 0.0]
    assert weighting.momentum[1].tolist() == pytest.approx([0.0, 0.75 * 1.0 + 0.25 * 4.0])
    weights = weighting.update(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), [0, 1])
    # m0 = 0.75·[1,0] + 0.25·[2,0] = [1.25, 0]; m1 = 0.75·[0,1.75] = [0, 1.3125]; orthogonal → λ ∝ 1/‖m‖²
    m0, m1 = 1.25 ** 2, 1.3125 ** 2
    assert weights.tolist() == pytest.approx([m1 / (m0 + m1), m0 / (m0 + m1)], rel=1e-5)
    state = weighting.state_dict()
    again = MoreWeighting(2, alpha=0.25, normalize="none")
    again.load_state_dict(state)
    assert again.momentum[1].tolist() == weighting.momentum[1].tolist()
    with pytest.raises(ValueError):
        MoreWeighting(2, alpha=0.0)


# ---------------------------------------------------------------------------------------------------------------
# reward-head gradients equal autograd on a real model
# ---------------------------------------------------------------------------------------------------------------
def _tiny_reward_model(name="tiny-random-llama"):
    from rlhfkit.models import ensure_pad_token, load_reward_model, load_tokenizer, resolve_model

    path, _ = resolve_model(name)
    tokenizer = load_tokenizer(path)
    model = load_reward_model(path, new_head=True)
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


def _batch(tokenizer):
    from rlhfkit.train.reward_trainer import PairCollator
    from rlhfkit.tokenization import render_ids

    def conv(prompt, response):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

    texts = [("hi", "good day to you", "bad"), ("tell me", "a long happy story about the sea", "no"),
             ("x", "yes", "no no no no"), ("why", "because", "the sun is bright and warm"),
             ("and", "kind words", "cruel words")]
    examples = [{"chosen_ids": render_ids(tokenizer, conv(p, c)), "rejected_ids": render_ids(tokenizer, conv(p, r)),
                 "source_index": i % 2, "margin": 0.1 * i} for i, (p, c, r) in enumerate(texts)]
    return PairCollator(pad_token_id=tokenizer.pad_token_id)(examples)


@pytest.mark.parametrize("name,lora", [("tiny-random-llama", False), ("tiny-random-llama", True),
                                       ("tiny-random-bert", False)])
def test_head_gradients_equal_autograd(name, lora):
    model, tokenizer = _tiny_reward_model(name)
    model.eval()  # no dropout, so the autograd reference sees the same forward
    weight = model.score.weight if hasattr(model, "score") else model.classifier.weight
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS",
                                                 modules_to_save=["score"]))
        weight = model.base_model.model.score.modules_to_save["default"].weight
    batch = _batch(tokenizer)
    with capture_reward_head(model) as capture:
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    chosen, rejected = rewards.chunk(2)
    features = capture.pooled_features(rewards, batch["input_ids"], tokenizer.pad_token_id)
    present, losses, _ = per_source_losses(chosen, rejected, batch["source_index"], batch["margin"], 0.01)
    ours = head_gradients(
        reward_gradients(chosen, rejected, batch["source_index"], present, batch["margin"], 0.01), features
    )
    assert present == [0, 1]
    for k, loss in enumerate(losses):
        expected = torch.autograd.grad(loss, weight, retain_graph=True)[0].reshape(-1)
        assert expected.abs().max() > 1e-4  # not trivially zero
        assert torch.allclose(ours[k], expected, atol=1e-6, rtol=1e-4)


def test_pooled_features_refuse_a_wrong_pad_token():
    model, tokenizer = _tiny_reward_model()
    batch = _batch(tokenizer)
    with capture_reward_head(model) as capture:
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    with pytest.raises(RuntimeError, match="last non-pad token"):
        capture.pooled_features(rewards, batch["input_ids"], pad_token_id=tokenizer.pad_token_id + 1)


# ---------------------------------------------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------------------------------------------
def test_every_batch_holds_every_source_in_equal_numbers():
    sources = [0] * 50 + [1] * 7 + [2] * 3
    sampler = SourceBalancedBatchSampler(sources, batch_size=7, seed=3)
    assert len(sampler) == math.ceil(60 / 7)
    batches = list(sampler)
    for number, batch in enumerate(batches):
        counts = [sum(sources[i] == s for i in batch) for s in range(3)]
        assert len(batch) == 7 and min(counts) >= 2 and max(counts) - min(counts) <= 1, (number, counts)
    assert batches == list(SourceBalancedBatchSampler(sources, batch_size=7, seed=3))  # deterministic
    # the large source is read without repetition until it is exhausted, across epochs
    seen_large = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen_large += [i for batch in sampler for i in batch if sources[i] == 0]
    assert len(seen_large) >= 50 and sorted(seen_large[:50]) == list(range(50))
    with pytest.raises(UserError, match="smaller than the number of sources"):
        SourceBalancedBatchSampler(sources, batch_size=2)


# ---------------------------------------------------------------------------------------------------------------
# MORE vs multitask on a synthetic two-source mixture
# ---------------------------------------------------------------------------------------------------------------
class _ToyRewardModel(nn.Module):
    """A one-hidden-layer reward model over feature vectors, with a linear `score` head like HF's."""

    def __init__(self, dim: int, hidden: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())
        self.score = nn.Linear(hidden, 1)

    def forward(self, features):
        return self.score(self.body(features)).squeeze(-1)


def _source(n, length_sign, generator, length_cue, dim=6, label_noise=0.1):
    """Pairs whose label follows a shared cue (feature 0, 'quality', 10% label noise), with a length-like cue
    (feature 1) that agrees with the label in one source and contradicts it in the other."""
    quality = torch.randn(n, 2, generator=generator)
    length = torch.randn(n, 2, generator=generator)
    other = torch.randn(n, 2, dim - 2, generator=generator)
    first_wins = (quality[:, 0] > quality[:, 1]) ^ (torch.rand(n, generator=generator) < label_noise)
    chosen_side = torch.where(first_wins, 0, 1)
    rows = torch.arange(n)

    def side(index):
        return torch.cat([quality[rows, index, None], length[rows, index, None], other[rows, index]], -1)

    chosen, rejected = side(chosen_side), side(1 - chosen_side)
    chosen[:, 1] += length_sign * length_cue / 2
    rejected[:, 1] -= length_sign * length_cue / 2
    return chosen, rejected


def _train_toy(objective, seed, steps=600, batch_size=16, lr=0.05, weighting="inverse_norm"):
    generator = torch.Generator().manual_seed(seed)
    large = _source(2000, +1, generator, length_cue=2.0)  # e.g. "helpful": longer is better
    small = _source(64, -1, generator, length_cue=1.0)  # e.g. "harmless": shorter (refusals) is better
    held_out = [_source(2000, +1, generator, 2.0), _source(2000, -1, generator, 1.0)]
    chosen, rejected = torch.cat([large[0], small[0]]), torch.cat([large[1], small[1]])
    source = torch.tensor([0] * 2000 + [1] * 64)
    torch.manual_seed(seed)
    model = _ToyRewardModel(chosen.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = SourceWeightedLoss(objective, ["large", "small"], alpha=0.99, normalize="l2", weighting=weighting)
    weights_small = []
    for rows in SourceBalancedBatchSampler(source.tolist(), batch_size, seed=seed, num_batches=steps):
        rows = torch.tensor(rows)
        with capture_reward_head(model) as capture:
            rewards = torch.cat([model(chosen[rows]), model(rejected[rows])])
        features = capture.pooled_features(rewards, None, None)
        loss, metrics = criterion(*rewards.chunk(2), source[rows], features=features)
        weights_small.append(metrics["weight/small"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = [float((model(c) > model(r)).float().mean()) for c, r in held_out]
    return accuracy, sum(weights_small) / len(weights_small)


@pytest.mark.slow  # two small training runs per seed (~6 s each here): kept out of make test-fast
@pytest.mark.parametrize("seed", [0, 1])
def test_more_beats_multitask_on_the_worst_source(seed):
    # --more_weighting inverse_norm; the reference rule with two sources and l2 is multitask (see below)
    (multi_large, multi_small), multi_weight = _train_toy("multitask", seed)
    (more_large, more_small), more_weight = _train_toy("more", seed)
    assert multi_weight == pytest.approx(0.5)
    assert more_weight > 0.55  # MORE shifts weight to the small, conflicting source
    worst_multi, worst_more = min(multi_large, multi_small), min(more_large, more_small)
    # measured: worst-source accuracy multitask → MORE, seed 0: 0.677 → 0.774, seed 1: 0.636 → 0.709
    # (seeds 2, 3: 0.580 → 0.701, 0.636 → 0.790); MORE gives up a little on the large source to get there
    assert worst_more > worst_multi + 0.03, (multi_large, multi_small, more_large, more_small)


# ---------------------------------------------------------------------------------------------------------------
# rm_train.py --objective more | multitask
# ---------------------------------------------------------------------------------------------------------------
def test_trainer_class():
    assert trainer_class("bt") is None
    assert trainer_class("more") is MoreRewardTrainer
    assert trainer_class("multitask") is MultitaskRewardTrainer
    with pytest.raises(UserError):
        trainer_class("mgda")


def _pairs_file(path, n, seed, topics):
    rng = random.Random(seed)
    good, bad = ["good", "great", "happy", "kind", "warm"], ["bad", "awful", "sad", "cruel", "cold"]
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n):
            topic = rng.choice(topics)
            row = {"prompt": [{"role": "user", "content": f"Tell me about {topic}."}],
                   "chosen": [{"role": "assistant", "content": f"{topic} is {' '.join(rng.sample(good, 2))}."}],
                   "rejected": [{"role": "assistant", "content": f"{topic} is {' '.join(rng.sample(bad, 2))}."}]}
            handle.write(json.dumps(row) + "\n")
    return path


def _rm_args(tmp_path, objective, *extra):
    import rm_train
    from rlhfkit.cli import parse_args

    # rows carry no `source`: load_preferences names each file's rows after the file
    helpful = _pairs_file(tmp_path / "helpful.jsonl", 24, 1, ["the sea", "a river", "the moon", "a ship"])
    harmless = _pairs_file(tmp_path / "harmless.jsonl", 6, 2, ["a dog", "a tree"])
    argv = ["--model_name_or_path", "tiny-random-llama", "--dataset_path", str(helpful), str(harmless),
            "--output_dir", str(tmp_path / "rm"), "--objective", objective, "--per_device_train_batch_size", "4",
            "--max_steps", "4", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2",
            "--report_to", "none", "--disable_tqdm", "true", "--learning_rate", "1e-3",
            "--gradient_checkpointing", "false", "--bf16", "false", "--use_cpu", "true",
            "--reward_stats_samples", "8", "--seed", "0", *extra]
    return rm_train, parse_args((rm_train.ScriptArguments, rm_train.ModelArguments, rm_train.RMArguments), argv)


@pytest.mark.slow
# inverse_norm: with two l2-normalised sources the reference rule is always ½, ½ (tested above), so only this rule
# shows weights moving away from ½ through the trainer
@pytest.mark.parametrize("objective,extra", [("more", ["--use_peft", "true", "--more_weighting", "inverse_norm"]),
                                             ("multitask", [])])
def test_rm_train_objective_smoke(tmp_path, objective, extra):
    rm_train, args = _rm_args(tmp_path, objective, "--validation_split_percentage", "20", *extra)
    metrics = rm_train.main(*args)
    out = tmp_path / "rm"
    # held-out accuracy per source, and the worst of them
    per_source = [metrics[key] for key in ("eval_accuracy/harmless", "eval_accuracy/helpful") if key in metrics]
    assert per_source and metrics["eval_worst_source_accuracy"] == min(per_source)
    run_info = json.loads((out / "run_info.json").read_text())
    assert run_info["complete"] and run_info["objective"] == objective
    assert math.isfinite(metrics["reward_stats"]["mean"])
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logs) == 4
    for entry in logs:  # every step saw both sources, with weights summing to 1
        assert {"weight/helpful", "weight/harmless", "loss/helpful", "loss/harmless"} <= entry.keys()
        assert entry["weight/helpful"] + entry["weight/harmless"] == pytest.approx(1.0, abs=1e-5)
    if objective == "multitask":
        assert all(entry["weight/harmless"] == pytest.approx(0.5) for entry in logs)
    else:
        assert any(abs(entry["weight/harmless"] - 0.5) > 1e-3 for entry in logs)
        saved = torch.load(out / "checkpoints" / "checkpoint-2" / "more_state.pt", weights_only=True)
        assert len(saved["momentum"]) == 2 and all(m is not None for m in saved["momentum"])


@pytest.mark.slow
def test_rm_train_more_resumes_with_its_momentum(tmp_path, monkeypatch):
    rm_train, args = _rm_args(tmp_path, "more", "--max_steps", "2")
    rm_train.main(*args)
    # an interrupted run of 4 steps whose last checkpoint is the one just written
    staging = tmp_path / "rm2.partial"
    shutil.copytree(tmp_path / "rm" / "checkpoints" / "checkpoint-2", staging / "checkpoints" / "checkpoint-2")
    (staging / "INCOMPLETE").write_text("")
    _, args = _rm_args(tmp_path, "more", "--resume_from_checkpoint", "true", "--output_dir", str(tmp_path / "rm2"))
    saved = torch.load(staging / "checkpoints" / "checkpoint-2" / "more_state.pt", weights_only=True)
    restored = []
    original = MoreWeighting.load_state_dict
    monkeypatch.setattr(MoreWeighting, "load_state_dict",
                        lambda self, state: (restored.append(state), original(self, state))[1])
    rm_train.main(*args)
    assert len(restored) == 1
    assert all(torch.equal(a, b) for a, b in zip(restored[0]["momentum"], saved["momentum"]))
    state = json.loads((tmp_path / "rm2" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]


@pytest.mark.slow
def test_rm_train_more_under_zero3_with_lora(tmp_path):
    """Two CPU ranks (DeepSpeed's CPU accelerator + gloo): the hook reads the partitioned model's head input, the
    per-source gradients are all-reduced, and the run writes a complete, reloadable reward model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("deepspeed")
    repo = Path(__file__).resolve().parents[1]
    helpful = _pairs_file(tmp_path / "helpful.jsonl", 24, 1, ["the sea", "a river", "the moon", "a ship"])
    harmless = _pairs_file(tmp_path / "harmless.jsonl", 8, 2, ["a dog", "a tree"])
    out = tmp_path / "rm-z3"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/zero3.yaml",
               "--num_processes", "2", "rm_train.py", "--model_name_or_path", "tiny-random-llama",
               "--dataset_path", str(helpful), str(harmless), "--output_dir", str(out), "--objective", "more",
               "--use_peft", "true", "--lora_r", "4", "--max_steps", "3", "--per_device_train_batch_size", "4",
               "--more_weighting", "inverse_norm",
               "--logging_steps", "1", "--save_strategy", "no", "--learning_rate", "5e-3", "--report_to", "none",
               "--disable_tqdm", "true", "--reward_stats_samples", "8"]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]
    logs = [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("{'loss'")]
    assert len(logs) == 3
    assert all(float(e["weight/helpful"]) + float(e["weight/harmless"]) == pytest.approx(1.0, abs=1e-3) for e in logs)
    assert any(abs(float(e["weight/harmless"]) - 0.5) > 1e-3 for e in logs)
    assert all(e["pairs"] == "8" for e in logs)  # both ranks' 4 pairs per step
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.score.weight.abs().sum() > 0


def test_objective_needs_batches_with_every_source(tmp_path):
    rm_train, args = _rm_args(tmp_path, "more", "--per_device_train_batch_size", "1")
    with pytest.raises(UserError, match="smaller than the number of sources"):
        rm_train.main(*args)


def test_more_without_a_head_fails_clearly():
    with pytest.raises(UserError, match="reward head"):
        with capture_reward_head(nn.Sequential(nn.Linear(3, 1))):
            pass



# ---------------------------------------------------------------------------------------------------------------
# the reference rule (dunzeng/MORE compute_lambda → more_ranking_loss(weights=λ)), --more_weighting reference
# ---------------------------------------------------------------------------------------------------------------
def _brute_force_min_norm(vectors):
    """Exact min over the simplex of ‖Σ λ_k x_k‖² by enumerating supports (KKT on each face)."""
    from itertools import combinations

    gram = (vectors.double() @ vectors.double().T)
    k = gram.shape[0]
    best = None
    for size in range(1, k + 1):
        for support in combinations(range(k), size):
            index = list(support)
            g = gram[index][:, index]
            system = torch.zeros(size + 1, size + 1, dtype=torch.float64)
            system[:size, :size] = g
            system[:size, size] = -1.0
            system[size, :size] = 1.0
            rhs = torch.zeros(size + 1, dtype=torch.float64)
            rhs[size] = 1.0
            try:
                solution = torch.linalg.solve(system, rhs)[:size]
            except RuntimeError:
                continue
            if (solution < -1e-12).any():
                continue
            weights = torch.zeros(k, dtype=torch.float64)
            weights[index] = solution
            cost = float(weights @ gram @ weights)
            if best is None or cost < best[0]:
                best = (cost, weights)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_weights_on_three_sources_match_a_brute_force_min_norm(seed):
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    raw[2] = -0.5 * raw[0] + 0.3 * torch.randn(6, generator=generator, dtype=torch.float64)  # conflicting sources
    unit, _ = normalize_gradients(raw, "l2")
    weighting = MoreWeighting(3, alpha=1.0, normalize="l2", weighting="reference")
    weights = weighting.update(raw, [0, 1, 2]).double()
    cost, exact = _brute_force_min_norm(unit)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert weights.tolist() == pytest.approx(exact.tolist(), abs=5e-3)
    assert _objective(weights, unit) == pytest.approx(cost, abs=1e-4)
    assert torch.allclose(weights, reference_min_norm_weights(unit).float().double())  # λ itself, not λ/‖g‖


def test_reference_rule_details():
    assert reference_min_norm_two(1.0, 1.0, 1.0) == (0.999, 1.0)  # v12 ≥ v11: the reference's boundary value
    assert reference_min_norm_two(4.0, 2.0, 1.0) == (0.001, 1.0)  # v12 ≥ v22
    gamma, _ = reference_min_norm_two(1.0, 0.0, 1.0)
    assert gamma == 0.5
    # two l2-normalised sources: always ½, ½, whatever the norms (the paper's method = multitask here)
    weights = MoreWeighting(2, normalize="l2", weighting="reference").update(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), [0, 1])
    assert weights.tolist() == pytest.approx([0.5, 0.5])
    inverse = MoreWeighting(2, normalize="l2", weighting="inverse_norm").update(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), [0, 1])
    assert inverse.tolist() == pytest.approx([2 / 7, 5 / 7])
    with pytest.raises(ValueError):
        MoreWeighting(2, weighting="mgda")


def test_reference_loss_is_lambda_weighted_raw_losses():
    chosen = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5, 0.3])
    rejected = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 0.9])
    source = torch.tensor([0, 0, 1, 1, 2, 2])
    features = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    criterion = SourceWeightedLoss("more", ["a", "b", "c"], alpha=1.0, normalize="l2", weighting="reference")
    loss, metrics = criterion(chosen, rejected, source, features=features)
    present, losses, _ = per_source_losses(chosen, rejected, source)
    grads = head_gradients(reward_gradients(chosen, rejected, source, present), features)
    unit, _ = normalize_gradients(grads.double(), "l2")
    lam = reference_min_norm_weights(unit)
    assert float(loss) == pytest.approx(float(sum(float(w) * loss_k for w, loss_k in zip(lam, losses))), rel=1e-5)
    assert [metrics[f"weight/{n}"] for n in "abc"] == pytest.approx(lam.tolist(), abs=1e-6)
