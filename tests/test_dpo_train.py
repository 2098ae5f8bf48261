"""dpo_train.py on a tiny random Llama: held-out margins rise, the reference is released with precomputed
log-probs, the policy works as an implicit reward model, SFT → DPO through disk, incomplete parents refused."""

import gc
import json
import shutil

import pytest
import torch

import dpo_train
import sft_train
from rlhfkit.cli import parse_args, run_stage
from rlhfkit.errors import UserError
from tests.conftest import REPO, TOPICS, sentiment_pairs, write_jsonl

torch.set_num_threads(1)  # 2 shared cores: oversubscribed threads make tiny models ~50x slower
TYPES = dpo_train.ARGUMENTS
COMMON = ["--logging_steps", "5", "--disable_tqdm", "true",
          "--save_strategy", "no", "--seed", "0", "--per_device_train_batch_size", "8",
          "--per_device_eval_batch_size", "16"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_data")
    train = write_jsonl(out / "train.jsonl", sentiment_pairs(64, seed=1, topics=TOPICS[:10]))
    heldout = write_jsonl(out / "heldout.jsonl", sentiment_pairs(32, seed=2, topics=TOPICS[10:]))
    return train, heldout


def _args(*argv):
    return parse_args(TYPES, list(argv))


def _live_causal_lms() -> int:
    from transformers import LlamaForCausalLM

    gc.collect()
    return sum(isinstance(obj, LlamaForCausalLM) for obj in gc.get_objects())


def _spy_trainer(monkeypatch, seen):
    class SpyDPOTrainer(dpo_train.PackedDPOTrainer):
        def train(self, *args, **kwargs):
            seen["ref_model"] = self.ref_model
            seen["live_models"] = _live_causal_lms()
            return super().train(*args, **kwargs)

    monkeypatch.setattr(dpo_train, "PackedDPOTrainer", SpyDPOTrainer)


def _pair_conversations(rows):
    chosen = [row["prompt"] + row["chosen"] for row in rows]
    rejected = [row["prompt"] + row["rejected"] for row in rows]
    return chosen, rejected


@pytest.mark.slow  # runs the stage's main to the end
def test_dpo_raises_heldout_margin_precomputed_reference_released_and_implicit_rm(tmp_path, pairs, monkeypatch,
                                                                                 tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.logprobs import implicit_rewards, sequence_logprobs

    # an explicit reference that is not the start dir: TRL would keep it; dpo_train must release it
    reference_dir = tmp_path / "reference"
    shutil.copytree(tiny_llama_dir, reference_dir)
    seen = {}
    _spy_trainer(monkeypatch, seen)
    before = _live_causal_lms()
    out = tmp_path / "dpo"
    metrics = dpo_train.main(*_args(
        "--model_name_or_path", "tiny-random-llama", "--ref_model_path", str(reference_dir),
        "--dataset_path", str(pairs[0]), "--eval_dataset_path", str(pairs[1]), "--output_dir", str(out),
        "--max_steps", "16", "--learning_rate", "5e-3", "--precompute_ref_log_probs", "true", *COMMON,
    ))
    assert seen["ref_model"] is None
    assert seen["live_models"] == before + 1, "only the policy may be alive during training"

    # TRL's held-out metrics: the chosen-minus-rejected log-ratio margin starts at 0 (policy == reference)
    assert metrics["eval_rewards/margins"] > 0.5 and metrics["eval_rewards/accuracies"] > 0.9, metrics
    info = json.loads((out / "run_info.json").read_text())
    assert info["reference"]["how"] == "precomputed before training from a separate reference model, then released"
    assert info["dataset"]["eval_pairs"] == 32

    # independently, with rlhfkit.logprobs: the held-out policy margin log π(c) − log π(r) grew ...
    heldout = [json.loads(line) for line in open(pairs[1])]
    chosen, rejected = _pair_conversations(heldout)
    tokenizer = AutoTokenizer.from_pretrained(out)
    policy = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)

    def mean_margin(model):
        c, r = sequence_logprobs(model, tokenizer, chosen, 16), sequence_logprobs(model, tokenizer, rejected, 16)
        return sum(x - y for x, y in zip(c, r)) / len(c)

    assert mean_margin(policy) > mean_margin(start) + 5.0
    # ... and the DPO policy read as an implicit reward model ranks held-out pairs far above chance (strict >)
    chosen_rewards = implicit_rewards(policy, start, tokenizer, chosen, batch_size=16, progress=False)
    rejected_rewards = implicit_rewards(policy, start, tokenizer, rejected, batch_size=16, progress=False)
    accuracy = sum(c > r for c, r in zip(chosen_rewards, rejected_rewards)) / len(heldout)
    assert accuracy >= 0.9, accuracy


@pytest.mark.slow  # runs the stage's main to the end
def test_default_reference_with_precompute_loads_no_second_model(tmp_path, pairs, monkeypatch):
    seen = {}
    _spy_trainer(monkeypatch, seen)
    before = _live_causal_lms()
    metrics = dpo_train.main(*_args(
        "--model_name_or_path", "tiny-random-llama", "--dataset_path", f"{pairs[0]}:16",
        "--output_dir", str(tmp_path / "dpo"), "--max_steps", "2", "--precompute_ref_log_probs", "true", *COMMON,
    ))
    assert seen["ref_model"] is None and seen["live_models"] == before + 1
    assert metrics["train_loss"] == pytest.approx(0.6931, abs=0.05)  # first steps: policy ≈ reference, loss ≈ log 2


@pytest.mark.slow  # runs the stage's main to the end
def test_chain_sft_then_dpo_through_disk_and_incomplete_parents_refused(tmp_path, pairs):
    sft_rows = [{"messages": row["prompt"] + row["chosen"]} for row in sentiment_pairs(32, seed=3)]
    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    sft_out = tmp_path / "sft"
    sft_train.main(*parse_args((sft_train.ScriptArguments, sft_train.ModelArguments, sft_train.SFTArguments), [
        "--model_name_or_path", "tiny-random-llama", "--dataset_path", str(sft_data), "--output_dir", str(sft_out),
        "--max_steps", "4", "--learning_rate", "3e-3", *COMMON,
    ]))

    dpo_out = tmp_path / "dpo"
    dpo_train.main(*_args(
        "--model_name_or_path", str(sft_out), "--dataset_path", f"{pairs[0]}:24", "--output_dir", str(dpo_out),
        "--max_steps", "3", "--learning_rate", "5e-3", "--loss_type", "ipo", "--beta", "0.5",
        "--use_peft", "true", "--lora_r", "4", "--gradient_checkpointing", "true", *COMMON,
    ))
    info = json.loads((dpo_out / "run_info.json").read_text())
    assert info["parent"] == {"path": str(sft_out.resolve()), "stage": "sft"}
    assert info["reference"]["requested"] == str(sft_out)
    assert info["reference"]["how"] == "computed every step from the starting policy with LoRA adapters disabled"
    assert info["objective"] == {"loss_type": ["ipo"], "beta": 0.5}
    rerun = _args("--config", str(dpo_out / "args.yaml"))  # args.yaml re-runs the stage as it ran
    assert rerun[0].dataset_path == [f"{pairs[0]}:24"] and rerun[1].use_peft and rerun[2].loss_type == ["ipo"]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(dpo_out)  # LoRA merged: a plain checkpoint
    assert not any("lora" in name for name, _ in merged.named_parameters())

    def refused(model_dir, match):
        with pytest.raises(UserError, match=match):
            dpo_train.main(*_args("--model_name_or_path", str(model_dir), "--dataset_path", str(pairs[0]),
                                  "--output_dir", str(tmp_path / "never"), *COMMON))
        assert not (tmp_path / "never").exists()

    incomplete = tmp_path / "sft_incomplete"
    shutil.copytree(sft_out, incomplete)
    run_info = json.loads((incomplete / "run_info.json").read_text())
    (incomplete / "run_info.json").write_text(json.dumps(run_info | {"complete": False}))
    refused(incomplete, "incomplete")
    interrupted = tmp_path / "sft_interrupted"
    shutil.copytree(sft_out, str(interrupted) + ".partial")
    refused(interrupted, "interrupted run")
    reward_model = tmp_path / "rm"
    shutil.copytree(sft_out, reward_model)
    (reward_model / "run_info.json").write_text(json.dumps(run_info | {"stage": "rm"}))
    refused(reward_model, "damaged")  # an edited file no longer matches the checksums the stage wrote
    from rlhfkit.integrity import write_checksums

    write_checksums(reward_model)  # a whole reward model: refused for what it is
    refused(reward_model, "is a reward model")


def test_cli_help_one_line_errors_and_recipes(tmp_path, pairs, capsys):
    with pytest.raises(SystemExit) as info:
        run_stage(dpo_train.main, TYPES, ["--help"])
    help_text = capsys.readouterr().out
    assert info.value.code == 0
    assert all(flag in help_text for flag in ("--ref_model_path", "--precompute_ref_log_probs", "--beta",
                                              "--loss_type", "--use_peft", "--validation_split_percentage"))

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"}, {"prompt": "hi"}])
    with pytest.raises(SystemExit) as info:
        run_stage(dpo_train.main, TYPES, ["--model_name_or_path", "tiny-random-llama", "--dataset_path", str(bad),
                                          "--output_dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: {bad}: row 2: field 'chosen': missing (a preference row needs chosen/rejected, or LMFlow "
        "positive/negative; found fields ['prompt']) (or pass --skip_invalid_rows true to skip and count such rows)"]

    for recipe in sorted((REPO / "configs" / "recipes" / "dpo").glob("*.yaml")):
        script_args, model_args, training_args = _args("--config", str(recipe))
        assert script_args.dataset_path and training_args.output_dir and model_args.model_name_or_path, recipe
