"""The pairwise forward inside the stages: every layout trains the same reward model and DPO policy."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TOPICS, sentiment_pairs, write_jsonl
from tests.test_rm_train import COMMON, run_rm

pytestmark = pytest.mark.slow


@pytest.fixture
def long_prompt_pairs(tmp_path):
    # prompts of varied length so layouts really differ (padding, sharing, several rows)
    rows = sentiment_pairs(48, seed=11, topics=TOPICS[:8])
    for i, row in enumerate(rows):
        row["prompt"][0]["content"] = "please " * (i % 7) * 3 + row["prompt"][0]["content"]
    heldout = sentiment_pairs(16, seed=12, topics=TOPICS[8:])
    return write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "heldout.jsonl", heldout)


def test_rm_30_steps_same_result_with_every_layout_and_token_budget(tmp_path, long_prompt_pairs):
    train, heldout = long_prompt_pairs
    results = {}
    for name, extra in {"padded": ["--pairwise_forward", "padded"],
                        "packed": ["--pairwise_forward", "packed"],
                        "prefix_shared": ["--pairwise_forward", "prefix_shared"],
                        "budget": ["--pairwise_forward", "prefix_shared", "--max_tokens_per_batch", "120"]}.items():
        out = tmp_path / name
        metrics = run_rm(["--model_name_or_path", "tiny-random-llama", "--dataset_path", str(train),
                          "--eval_dataset_path", str(heldout), "--output_dir", str(out), "--max_steps", "30",
                          "--learning_rate", "1e-3", *extra, *COMMON])
        assert json.loads((out / "run_info.json").read_text())["pairwise_forward"] == (
            "prefix_shared" if name == "budget" else name)
        results[name] = metrics
    for name in ("packed", "prefix_shared", "budget"):
        for key in ("eval_loss", "eval_accuracy", "eval_margin", "train_loss"):
            assert results[name][key] == pytest.approx(results["padded"][key], abs=1e-3), (name, key)


def test_encoder_rm_is_packed(tmp_path, long_prompt_pairs):
    train, heldout = long_prompt_pairs
    results = {}
    for name in ("padded", "auto"):
        out = tmp_path / name
        results[name] = run_rm(["--model_name_or_path", "tiny-random-bert", "--dataset_path", str(train),
                                "--eval_dataset_path", str(heldout), "--output_dir", str(out), "--max_steps", "6",
                                "--learning_rate", "1e-3", "--pairwise_forward", name, *COMMON])
        layout = json.loads((out / "run_info.json").read_text())["pairwise_forward"]
        assert layout == ("padded" if name == "padded" else "packed")
    for key in ("eval_loss", "eval_accuracy", "train_loss"):
        assert results["auto"][key] == pytest.approx(results["padded"][key], abs=1e-3), key


def _run_dpo(argv):
    import dpo_train
    from rlhfkit.cli import parse_args

    return dpo_train.main(*parse_args(dpo_train.ARGUMENTS, argv))


DPO_COMMON = ["--model_name_or_path", "tiny-random-llama", "--logging_steps", "1", "--disable_tqdm", "true",
              "--save_strategy", "no", "--seed", "0", "--per_device_train_batch_size", "8",
              "--per_device_eval_batch_size", "8", "--report_to", "none", "--use_cpu", "true"]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("setup", ["precomputed", "lora_reference", "ipo_keep_end"])
def test_dpo_prefix_shared_equals_trl_padded(tmp_path, long_prompt_pairs, setup):
    train, heldout = long_prompt_pairs
    extra = {"precomputed": ["--precompute_ref_log_probs", "true", "--learning_rate", "1e-3"],
             "lora_reference": ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
                                "--learning_rate", "5e-3"],
             "ipo_keep_end": ["--loss_type", "ipo", "--max_length", "20", "--truncation_mode", "keep_end",
                              "--learning_rate", "1e-3"]}[setup]
    results = {}
    for name in ("padded", "prefix_shared", "budget"):
        layout = ["--pairwise_forward", "prefix_shared", "--max_tokens_per_batch", "150"] if name == "budget" else \
            ["--pairwise_forward", name]
        out = tmp_path / name
        results[name] = _run_dpo([*DPO_COMMON, "--dataset_path", str(train), "--eval_dataset_path", str(heldout),
                                  "--output_dir", str(out), "--max_steps", "8", *extra, *layout])
        info = json.loads((out / "run_info.json").read_text())
        assert info["pairwise_forward"] == ("padded" if name == "padded" else "prefix_shared")
    for name in ("prefix_shared", "budget"):
        for key in ("train_loss", "eval_loss", "eval_rewards/margins", "eval_rewards/accuracies",
                    "eval_logps/chosen", "eval_logps/rejected", "eval_entropy", "eval_mean_token_accuracy"):
            assert results[name][key] == pytest.approx(results["padded"][key], abs=1e-3, rel=1e-3), (name, key)


def test_dpo_one_sgd_step_gives_the_same_weights(tmp_path, long_prompt_pairs):
    train, _ = long_prompt_pairs
    weights = {}
    for name in ("padded", "prefix_shared"):
        out = tmp_path / name
        _run_dpo([*DPO_COMMON, "--dataset_path", str(train), "--output_dir", str(out), "--max_steps", "1",
                  "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant",
                  "--pairwise_forward", name])
        weights[name] = _weights(out)
    start = _weights(__import__("rlhfkit.builtin_models", fromlist=["x"]).materialize("tiny-random-llama"))
    moved = max((weights["padded"][k] - start[k]).abs().max().item() for k in start if k in weights["padded"])
    assert moved > 1e-4  # the step really changed the weights
    for key, value in weights["padded"].items():
        assert torch.allclose(value, weights["prefix_shared"][key], atol=1e-5), key
