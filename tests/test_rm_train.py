"""rm_train.py + eval_benchmark.py end to end on tiny models: learning, reload, LoRA, encoders, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhfkit.cli import parse_args
from tests.conftest import REPO, TOPICS, sentiment_pairs, write_jsonl

pytestmark = pytest.mark.slow


def run_rm(argv: list[str]) -> dict:
    import rm_train

    parsed = parse_args(rm_train.ARGUMENTS, argv)
    return rm_train.main(*parsed)


def run_eval(argv: list[str]) -> dict:
    import eval_benchmark

    (args,) = parse_args((eval_benchmark.ScriptArguments,), argv)
    return eval_benchmark.main(args)


COMMON = ["--per_device_train_batch_size", "8", "--logging_steps", "4", "--report_to", "none",
          "--save_strategy", "no", "--use_cpu", "true", "--seed", "0", "--disable_tqdm", "true"]


def score_with_plain_transformers(model_dir: Path, rows: list[dict]) -> list[float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    scores = []
    with torch.no_grad():
        for row in rows:
            for side in ("chosen", "rejected"):
                ids = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=True)["input_ids"]
                scores.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    return scores


def eval_scores(output_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (output_dir / "scores.jsonl").read_text().splitlines()]
    return [value for line in lines for value in (line["chosen_score"], line["rejected_score"])]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_rm_ranks_heldout_pairs_and_reloads_with_plain_transformers(tmp_path, sentiment_data, lora):
    train, heldout = sentiment_data
    out = tmp_path / "rm"
    extra = ["--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "5e-3"] if lora else \
        ["--learning_rate", "1e-3"]
    metrics = run_rm(["--model_name_or_path", "tiny-random-llama", "--dataset_path", str(train), "--output_dir", str(out),
                      "--num_train_epochs", "3", *extra, *COMMON])
    assert metrics["reward_stats"]["std"] > 0
    run_info = json.loads((out / "run_info.json").read_text())
    assert run_info["complete"] and run_info["stage"] == "rm" and run_info["model"]["builtin"] == "tiny-random-llama"
    assert not (out / "adapter_model.safetensors").exists()  # LoRA merged into a plain checkpoint

    results = run_eval(["--reward_model_path", str(out), "--dataset_path", str(heldout),
                        "--output_dir", str(tmp_path / "eval"), "--calibration", "false"])
    assert results["accuracy"] >= 0.9, results["accuracy"]

    heldout_rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    plain = score_with_plain_transformers(out, heldout_rows)
    assert plain == pytest.approx(eval_scores(tmp_path / "eval"), abs=1e-5)


def test_encoder_backbone_trains_and_saves_a_classifier(tmp_path, sentiment_data):
    train, _ = sentiment_data
    out = tmp_path / "rm-bert"
    run_rm(["--model_name_or_path", "tiny-random-bert", "--dataset_path", f"{train}:16", "--output_dir", str(out),
            "--max_steps", "2", "--max_length", "64", *COMMON])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["BertForSequenceClassification"] and config.num_labels == 1
    info = json.loads((out / "run_info.json").read_text())
    assert info["tokenizer"]["chat_template"] in ("tokenizer", "default")


def test_margin_column_and_truncation_are_reported(tmp_path):
    rows = sentiment_pairs(16, seed=5, topics=TOPICS[:4])
    for i, row in enumerate(rows):
        row["margin"] = 0.5
        if i % 4 == 0:
            row["prompt"][0]["content"] = "the sea " * 60 + row["prompt"][0]["content"]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    metrics = run_rm(["--model_name_or_path", "tiny-random-llama", "--dataset_path", str(path),
                      "--output_dir", str(tmp_path / "rm"), "--max_steps", "1", "--max_length", "48", *COMMON])
    assert metrics["data"]["train"]["truncated"] == 4 and metrics["data"]["train"]["kept"] == 16
    dropped = run_rm(["--model_name_or_path", "tiny-random-llama", "--dataset_path", str(path), "--truncation", "drop",
                      "--output_dir", str(tmp_path / "rm2"), "--max_steps", "1", "--max_length", "48", *COMMON])
    assert dropped["data"]["train"]["dropped_too_long"] == 4 and dropped["data"]["train"]["kept"] == 12


def test_eval_benchmark_matches_hand_computation(tmp_path, monkeypatch, tiny_llama_dir):
    """Fixture with ties, two sections and missing ones; scores come from a rule so the expected numbers are known."""
    import rlhfkit.scoring

    rows = []
    plan = [("alpacaeval-easy", 3, 1), ("alpacaeval-easy", 1, 1), ("alpacaeval-easy", 2, 0), ("mt-bench-easy", 0, 2),
            ("hep-python", 2, 1), ("math-prm", 1, 2), ("math-prm", 1, 1), ("my-set", 5, 0)]
    for i, (subset, good_chosen, good_rejected) in enumerate(plan):
        rows.append({"prompt": f"q{i}", "chosen": "good " * good_chosen + f"c{i}", "rejected": "good " * good_rejected + f"r{i}",
                     "subset": subset, "id": str(i)})
    path = write_jsonl(tmp_path / "rb.jsonl", rows)

    def rule_scores(model, tokenizer, conversations, *args, **kwargs):
        return [float(conv[-1]["content"].count("good")) for conv in conversations]

    monkeypatch.setattr(rlhfkit.scoring, "score_conversations", rule_scores)
    rm_dir = tmp_path / "rm"
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=1).save_pretrained(rm_dir)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(rm_dir)
    results = run_eval(["--reward_model_path", str(rm_dir), "--dataset_path", str(path),
                        "--output_dir", str(tmp_path / "eval"), "--calibration", "false"])
    chat = 100 * ((2 / 3) * 100 + 0 * 28) / 128
    reasoning = 100 * (1 * 164 + 0 * 984) / (164 + 984)
    summary = results["rewardbench"]
    assert results["ties"] == 2
    assert summary["sections"]["Chat"] == pytest.approx(chat)
    assert summary["sections"]["Reasoning"] == pytest.approx(reasoning)
    assert summary["score"] == pytest.approx((chat + reasoning) / 4)
    assert summary["other_subsets"] == ["my-set"]
    table = (tmp_path / "eval" / "table.txt").read_text()
    assert "Chat Hard" in table and "missing" in table


def _launch(args: list[str], env_extra: dict | None = None, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def test_eval_two_processes_equal_one(tmp_path, sentiment_data, tiny_llama_dir):
    _, heldout = sentiment_data
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=1).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(rm_dir)
    common = ["eval_benchmark.py", "--reward_model_path", str(rm_dir), "--dataset_path", str(heldout),
              "--batch_size", "3", "--calibration", "false"]
    one = _launch([sys.executable, *common, "--output_dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
                   "--num_processes", "2", *common, "--output_dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "results.json").read_text())["processes"] == 2  # really two ranks (gloo)
    assert eval_scores(tmp_path / "one") == pytest.approx(eval_scores(tmp_path / "two"), abs=1e-5)
    assert json.loads((tmp_path / "one" / "metrics.json").read_text()) == json.loads((tmp_path / "two" / "metrics.json").read_text())


def test_killed_run_leaves_nothing_a_stage_accepts_and_resumes(tmp_path, sentiment_data):
    train, heldout = sentiment_data
    out = tmp_path / "rm"
    base = [sys.executable, "rm_train.py", "--model_name_or_path", "tiny-random-llama", "--dataset_path", str(train),
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--save_steps", "2", "--report_to", "none",
            "--use_cpu", "true", "--learning_rate", "1e-3", "--disable_tqdm", "true"]
    proc = subprocess.Popen([*base, "--max_steps", "400"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    checkpoints = Path(f"{out}.partial") / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    refused = _launch([sys.executable, "eval_benchmark.py", "--reward_model_path", str(out), "--dataset_path",
                       str(heldout), "--output_dir", str(tmp_path / "eval")])
    assert refused.returncode == 2 and "interrupted run" in refused.stderr and "Traceback" not in refused.stderr
    refused_partial = _launch([sys.executable, "eval_benchmark.py", "--reward_model_path", f"{out}.partial",
                               "--dataset_path", str(heldout), "--output_dir", str(tmp_path / "eval")])
    assert refused_partial.returncode == 2 and "incomplete" in refused_partial.stderr

    last = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/trainer_state.json"))
    resumed = _launch([*base, "--max_steps", str(last + 2), "--resume_from_checkpoint", "true",
                       "--allow_changed_args", "max_steps"])  # shorter than the run it continues: on purpose
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "run_info.json").exists()
    state = json.loads((out / "checkpoints" / f"checkpoint-{last + 2}" / "trainer_state.json").read_text())
    assert state["global_step"] == last + 2
    first_logged = min(entry["step"] for entry in state["log_history"] if "loss" in entry) if any(
        "loss" in e for e in state["log_history"]) else last + 1
    assert first_logged >= 1


BAD_INVOCATIONS = [
    (["--dataset_path", "{bad}"], "bad.jsonl: row 2: field 'chosen'"),
    (["--dataset_path", "{train}", "--truncation", "middle"], "--truncation must be left_prompt or drop"),
    (["--dataset_path", "{train}", "--learning_rat", "1"], "unknown argument '--learning_rat'"),
    (["--dataset_path", "{missing}"], "missing.jsonl: file not found"),
    (["--dataset_path", "{train}", "--model_name_or_path", "{partial}"], "incomplete"),
    (["--dataset_path", "{train}", "--attn_implementation", "flash_attention_2"], "flash_attn"),
    (["--dataset_path", "{train}", "--load_in_4bit", "true", "--use_peft", "true"], "bitsandbytes"),
]


@pytest.mark.parametrize("extra,expected", BAD_INVOCATIONS)
def test_bad_invocations_fail_with_one_line(tmp_path, sentiment_data, capsys, extra, expected):
    """The first case runs as a user's process (`python rm_train.py`); the others through the same entry point
    (`run_stage`) in this process, which is where the one line is made (a process start costs ~12 s here)."""
    from tests.test_faults_stages import run_in_process

    train, _ = sentiment_data
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                {"prompt": "q", "chosen": "", "rejected": "b"}])
    partial = tmp_path / "parent.partial"
    partial.mkdir()
    (partial / "INCOMPLETE").write_text("")
    values = {"bad": bad, "train": train, "missing": tmp_path / "missing.jsonl", "partial": partial}
    args = [a.format(**values) for a in extra]
    if "--model_name_or_path" not in args:
        args += ["--model_name_or_path", "tiny-random-llama"]
    args += ["--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    if extra is BAD_INVOCATIONS[0][0]:
        result = _launch([sys.executable, "rm_train.py", *args], timeout=300)
        code, err = result.returncode, result.stderr
    else:
        code, err = run_in_process("rm_train", args, capsys)
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
