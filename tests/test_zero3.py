"""ZeRO-3 on CPU with 2 ranks (DeepSpeed's CPU accelerator + gloo): the saved weights are complete.

"Complete" is checked against the gathered model itself: the eval rewards computed during the run by the
partitioned ZeRO-3 model equal the rewards of the saved checkpoint reloaded with plain transformers.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, write_jsonl

pytestmark = pytest.mark.slow


def mean_reward_and_margin(model_dir, rows):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rewards, margins = [], []
    with torch.no_grad():
        for row in rows:
            pair = []
            for side in ("chosen", "rejected"):
                ids = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=True)["input_ids"]
                pair.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
            rewards += pair
            margins.append(pair[0] - pair[1])
    return sum(rewards) / len(rewards), sum(margins) / len(margins)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_zero3_two_ranks_saves_complete_weights(tmp_path, sentiment_data, tiny_llama_dir, lora):
    pytest.importorskip("deepspeed")
    train, heldout_all = sentiment_data
    rows = [json.loads(line) for line in heldout_all.read_text().splitlines()][:8]
    heldout = write_jsonl(tmp_path / "heldout8.jsonl", rows)
    out = tmp_path / "rm-z3"
    extra = ["--use_peft", "true", "--lora_r", "4", "--learning_rate", "5e-3"] if lora else ["--learning_rate", "1e-3"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/zero3.yaml",
               "--num_processes", "2", "rm_train.py", "--model_name_or_path", str(tiny_llama_dir),
               "--dataset_path", f"{train}:32", "--eval_dataset_path", str(heldout), "--output_dir", str(out),
               "--max_steps", "3", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
               "--report_to", "none", "--disable_tqdm", "true", *extra]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    reward_mean, margin = mean_reward_and_margin(out, rows)
    assert reward_mean == pytest.approx(metrics["eval_reward_mean"], abs=1e-4)
    assert margin == pytest.approx(metrics["eval_margin"], abs=1e-4)
    assert metrics["eval_reward_std"] > 0  # a trained head, not an all-zero one


@pytest.mark.parametrize("stage", ["pm", "prm"])
def test_zero3_two_ranks_trains_the_preference_and_process_reward_models(tmp_path, tiny_llama_dir, stage):
    """pm_train.py and prm_train.py under ZeRO-3 on 2 ranks: the run finishes and learns, every saved tensor is
    whole (a partitioned parameter saved as is would be empty), and the reloaded PM prefers every held-out chosen
    response, as the partitioned model did in the run's evaluation."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import sentiment_pairs
    from tests.test_process_reward import parity_rows

    if stage == "pm":  # the settings of each stage's single-process chain test
        train, heldout, epochs, lr = sentiment_pairs(64, seed=1), sentiment_pairs(8, seed=2), "4", "1e-2"
    else:
        train, heldout, epochs, lr = parity_rows(64, seed=1), parity_rows(8, seed=2), "6", "5e-3"
    out = tmp_path / stage
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/zero3.yaml",
               "--num_processes", "2", f"{stage}_train.py", "--model_name_or_path", str(tiny_llama_dir),
               "--dataset_path", str(write_jsonl(tmp_path / "train.jsonl", train)),
               "--eval_dataset_path", str(write_jsonl(tmp_path / "heldout.jsonl", heldout)), "--output_dir", str(out),
               "--num_train_epochs", epochs, "--learning_rate", lr, "--per_device_train_batch_size", "4",
               "--per_device_eval_batch_size", "4", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]
    expected = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out)).state_dict()
    saved = load_file(out / "model.safetensors")
    assert all(saved[name].shape == tensor.shape for name, tensor in expected.items() if name in saved)
    assert {name for name in expected if "rotary" not in name} - set(saved) <= {"lm_head.weight"}  # tied head
    metrics = json.loads((out / "metrics.json").read_text())
    if stage == "pm":
        from rlhfkit.preference_model import PreferenceModelScorer

        scorer = PreferenceModelScorer(str(out), batch_size=4)
        probabilities = scorer.compare([(r["prompt"], r["chosen"][0]["content"], r["rejected"][0]["content"])
                                        for r in heldout])
        assert metrics["eval_accuracy"] == 1.0 and all(p > 0.5 for p in probabilities)
    else:
        assert metrics["eval_step_accuracy"] >= 0.9 and metrics["eval_step_accuracy_before"] < 0.7
