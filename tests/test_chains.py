"""The shell chains end to end on the tiny model (2 prompts × 2 samples, 2 training steps): iterative DPO and
rejection sampling; a failing stage stops the chain, a rerun resumes at the first unfinished stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

LABELERS = '''
import hashlib

def distinct(prompts, responses):
    """A deterministic score that ties only identical responses, so every prompt yields a pair."""
    return [int(hashlib.sha256(r.encode()).hexdigest()[:8], 16) / 2**32 for r in responses]

def broken(prompts, responses):
    return [0.0]  # one score for many responses: annotate must fail
'''

TRAIN_ARGS = "--max_steps 2 --per_device_train_batch_size 2 --save_strategy no --report_to none --logging_steps 1"


@pytest.fixture
def chain_inputs(tmp_path):
    (tmp_path / "labelers.py").write_text(LABELERS)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "tell a story about the sea"}\n{"question": "why is the sky blue?"}\n')
    return tmp_path, str(prompts)


def run_chain(script, *flags):
    env = dict(os.environ, PYTHON=sys.executable, TOKENIZERS_PARALLELISM="false")
    return subprocess.run(["bash", str(REPO / "scripts" / script), *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def common_flags(tmp_path, prompts, labeler):
    return ["--model", "tiny-random-llama", "--prompts", prompts, "--labeler", f"{tmp_path}/labelers.py:{labeler}",
            "--work_dir", str(tmp_path / "work"), "--iterations", "1", "--num_samples", "2", "--max_new_tokens", "8",
            "--train_args", TRAIN_ARGS]


def info(path):
    return json.loads((path / "run_info.json").read_text())


@pytest.mark.slow
def test_iterative_dpo_stops_on_failure_then_resumes(chain_inputs):
    tmp_path, prompts = chain_inputs
    iteration = tmp_path / "work" / "iter1"

    failed = run_chain("iterative_dpo.sh", *common_flags(tmp_path, prompts, "broken"))
    assert failed.returncode != 0
    assert "returned 1 scores for 4 responses" in failed.stderr
    assert info(iteration / "gen")["complete"]
    assert not (iteration / "annotated").exists() and not (iteration / "policy").exists()  # DPO never ran

    done = run_chain("iterative_dpo.sh", *common_flags(tmp_path, prompts, "distinct"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "iteration 1: generation done" in done.stderr  # resumed after the finished stage
    pairs = [json.loads(line) for line in open(iteration / "annotated" / "pairs.jsonl")]
    assert len(pairs) == 2 and all(p["margin"] > 0 for p in pairs)
    policy = info(iteration / "policy")
    assert policy["complete"] and policy["stage"] == "dpo"
    assert done.stdout.strip().splitlines()[-1] == str(iteration / "policy")

    again = run_chain("iterative_dpo.sh", *common_flags(tmp_path, prompts, "distinct"))
    assert again.returncode == 0 and "iteration 1: complete" in again.stderr
    assert info(iteration / "policy")["created"] == policy["created"]  # nothing was redone


@pytest.mark.slow
def test_rejection_sampling_chain(chain_inputs):
    tmp_path, prompts = chain_inputs
    result = run_chain("rejection_sampling.sh", *common_flags(tmp_path, prompts, "distinct"))
    assert result.returncode == 0, result.stderr[-3000:]
    iteration = tmp_path / "work" / "iter1"
    sft_rows = [json.loads(line) for line in open(iteration / "annotated" / "sft.jsonl")]
    rewards = [json.loads(line) for line in open(iteration / "annotated" / "rewards.jsonl")]
    assert [row["messages"][-1]["content"] for row in sft_rows] == [
        row["responses"][row["rewards"].index(max(row["rewards"]))] for row in rewards]
    assert not (iteration / "annotated" / "pairs.jsonl").exists()
    policy = info(iteration / "policy")
    assert policy["complete"] and policy["stage"] == "sft"


def test_chain_flag_errors(chain_inputs):
    tmp_path, prompts = chain_inputs
    usage = run_chain("iterative_dpo.sh", "--help")
    assert usage.returncode == 0 and "--reference iteration|fixed" in usage.stdout
    bad = run_chain("iterative_dpo.sh", "--model", "m", "--prompts", prompts, "--work_dir", str(tmp_path / "w"),
                    "--labeler", "vader", "--iterationz", "2")
    assert bad.returncode != 0 and "unknown flag --iterationz" in bad.stderr
    both = run_chain("rejection_sampling.sh", "--model", "m", "--prompts", prompts, "--work_dir", str(tmp_path / "w"),
                     "--labeler", "vader", "--reward_model", "rm")
    assert both.returncode != 0 and "only one of" in both.stderr
