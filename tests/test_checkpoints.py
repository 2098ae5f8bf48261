"""The stage contract: staging dir, atomic finalize, refusing incomplete parents, LoRA merge of a state dict."""

import json

import pytest
import torch

from rlhfkit.checkpoints import INCOMPLETE_MARKER, StageOutput, check_parent, merge_lora_state_dict
from rlhfkit.errors import UserError


def fake_weights(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"x")


def test_finalize_renames_and_parent_is_accepted(tmp_path):
    out = StageOutput(tmp_path / "run", stage="rm")
    assert (out.staging / INCOMPLETE_MARKER).exists() and not (tmp_path / "run").exists()
    fake_weights(out.staging)
    with pytest.raises(UserError, match="incomplete"):
        check_parent(out.staging)
    final = out.finalize({"note": 1}, {"accuracy": 0.9}, {"lr": 1})
    info = json.loads((final / "run_info.json").read_text())
    assert info["complete"] and info["stage"] == "rm" and "model.safetensors" in info["files"]
    assert json.loads((final / "metrics.json").read_text()) == {"accuracy": 0.9}
    assert not out.staging.exists()
    assert check_parent(final)["stage"] == "rm"


def test_missing_parent_points_at_partial(tmp_path):
    out = StageOutput(tmp_path / "run", stage="sft")
    fake_weights(out.staging)
    with pytest.raises(UserError, match=r"run.partial is what an interrupted run left"):
        check_parent(tmp_path / "run")


def test_parent_missing_listed_file_or_weights(tmp_path):
    out = StageOutput(tmp_path / "run", stage="sft")
    fake_weights(out.staging)
    final = out.finalize({}, {})
    (final / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weight files"):
        check_parent(final)


def test_existing_output_needs_overwrite_and_leftover_checkpoints_need_resume(tmp_path):
    out = StageOutput(tmp_path / "run", stage="rm")
    fake_weights(out.staging)
    out.finalize({}, {})
    with pytest.raises(UserError, match="--overwrite_output_dir"):
        StageOutput(tmp_path / "run", stage="rm")
    again = StageOutput(tmp_path / "other", stage="rm")
    (again.checkpoints / "checkpoint-4").mkdir(parents=True)
    (again.checkpoints / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (again.checkpoints / "checkpoint-6").mkdir(parents=True)  # cut short by a kill: no trainer_state.json
    (again.checkpoints / "checkpoint-6" / "model.safetensors").write_text("partial")
    (again.checkpoints / "checkpoint-8").mkdir(parents=True)  # the disk filled up while writing trainer_state.json
    (again.checkpoints / "checkpoint-8" / "trainer_state.json").write_text('{"global_step": 8, "log_hi')
    with pytest.raises(UserError, match="--resume_from_checkpoint true"):
        StageOutput(tmp_path / "other", stage="rm")
    resumed = StageOutput(tmp_path / "other", stage="rm", resume=True)
    assert resumed.resolve_resume("true").endswith("checkpoint-4")


def test_merge_lora_state_dict_matches_peft_merge():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["0"], modules_to_save=["2"])
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_lora_state_dict(state, config)
    reference = model.merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for key in reference:
        assert torch.allclose(merged[key], reference[key], atol=1e-6), key
