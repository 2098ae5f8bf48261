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
