"""The stage contract: staging dir, atomic finalize, refusing incomplete parents, LoRA merge of a state dict; checksums
of checkpoints and stage outputs; a resume compared with the run it continues (rlhfkit/integrity.py)."""

import hashlib
import json

import pytest
import torch

from rlhfkit.checkpoints import INCOMPLETE_MARKER, StageOutput, check_parent
from rlhfkit.saving import merge_lora_state_dict
from rlhfkit.errors import UserError
from rlhfkit.integrity import CHECKSUMS, check_resume, compare_identities, configure, verify_checksums, write_checksums


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
    write_checksums(again.checkpoints / "checkpoint-4")  # sealed, as rlhfkit.faults.seal_checkpoint does
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


# ---------------------------------------------------------------------------------------------------------------
# checksums: written last, checked before a parent or a checkpoint is trusted
# ---------------------------------------------------------------------------------------------------------------
def _flip_one_byte(path, offset=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(autouse=True)
def default_integrity_settings():
    configure()  # --verify_parent full, nothing allowed: what a stage gets without the flags
    yield
    configure()


def test_finalize_writes_checksums_of_every_file_last(tmp_path):
    out = StageOutput(tmp_path / "run", stage="rm")
    fake_weights(out.staging)
    (out.staging / "value_model").mkdir()
    (out.staging / "value_model" / "model.safetensors").write_bytes(b"critic")
    (out.checkpoints / "checkpoint-2").mkdir(parents=True)
    (out.checkpoints / "checkpoint-2" / "optimizer.pt").write_bytes(b"o")
    final = out.finalize({}, {"accuracy": 1.0}, {"lr": 1})
    files = json.loads((final / CHECKSUMS).read_text())["files"]
    # run_info.json is covered (it was written before); checkpoints carry their own; markers are gone
    assert set(files) == {"config.json", "model.safetensors", "value_model/model.safetensors", "metrics.json",
                          "args.yaml", "run_info.json"}
    assert files["model.safetensors"] == {"size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
    assert check_parent(final)["verified"] == "full"


def test_one_flipped_byte_in_a_parent_is_one_line_naming_the_file_and_both_digests(tmp_path):
    out = StageOutput(tmp_path / "run", stage="sft")
    fake_weights(out.staging)
    (out.staging / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    final = out.finalize({}, {})
    expected = hashlib.sha256((final / "model.safetensors").read_bytes()).hexdigest()
    _flip_one_byte(final / "model.safetensors", offset=1000)
    actual = hashlib.sha256((final / "model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(UserError) as caught:
        check_parent(final, role="policy")
    message = str(caught.value)
    assert "\n" not in message and str(final / "model.safetensors") in message
    assert f"sha256 {actual}, expected {expected}" in message
    # the cheaper modes: a flipped byte keeps the size (not caught by `size`), a cut file does not
    assert verify_checksums(final, "size") == "size" and verify_checksums(final, "none") == "none"
    (final / "model.safetensors").write_bytes(b"cut")
    with pytest.raises(UserError, match=r"model.safetensors: damaged: size 3 bytes, expected 16384"):
        verify_checksums(final, "size")
    (final / "model.safetensors").unlink()
    with pytest.raises(UserError, match="missing"):
        verify_checksums(final, "size")


def test_parent_without_checksums_is_accepted_unverified(tmp_path):
    plain = tmp_path / "hf-download"
    fake_weights(plain)
    assert check_parent(plain)["verified"] == "no checksums"


def test_resume_skips_a_damaged_checkpoint_by_name(tmp_path, caplog):
    out = StageOutput(tmp_path / "run", stage="rm")
    for step in (2, 4, 6):
        checkpoint = out.checkpoints / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "model.safetensors").write_bytes(bytes([step]) * 100)
        (checkpoint / "trainer_state.json").write_text("{}")
        if step != 6:  # checkpoint-6: killed after trainer_state.json, before it was sealed
            write_checksums(checkpoint)
    _flip_one_byte(out.checkpoints / "checkpoint-4" / "model.safetensors", offset=50)
    resumed = StageOutput(tmp_path / "run", stage="rm", resume=True)
    with caplog.at_level("WARNING"):
        assert resumed.resolve_resume("true").endswith("checkpoint-2")
    assert "checkpoint-6 is incomplete" in caplog.text
    assert "checkpoint-4/model.safetensors: damaged: sha256" in caplog.text and "not resuming from it" in caplog.text
    with pytest.raises(UserError, match="checkpoint-4/model.safetensors: damaged"):  # named explicitly: an error
        resumed.resolve_resume(str(out.checkpoints / "checkpoint-4"))


# ---------------------------------------------------------------------------------------------------------------
# a resume is the run it claims to be
# ---------------------------------------------------------------------------------------------------------------
def _identity(**changes):
    arguments = {"learning_rate": 5e-5, "per_device_train_batch_size": 4, "max_steps": 100, "num_train_epochs": 3.0,
                 "logging_steps": 10, "save_steps": 50, "report_to": ["none"], "seed": 0, "output_dir": "/o",
                 "resume_from_checkpoint": None, "local_rank": 0, "load_best_model_at_end": False, "eval_steps": 50}
    identity = {"dataset": "aaaa (40 rows)", "model": "m1", "tokenizer": "t1", "num_processes": 1,
                "toolkit_version": "0.1.0"}
    for key, value in changes.items():
        (identity if key in identity else arguments)[key] = value
    return {"arguments": arguments, **identity}


def test_result_changing_differences_are_refused_in_one_line_naming_each(tmp_path):
    check_resume(tmp_path, _identity(), None, "rm")  # the first run records itself
    changed = _identity(learning_rate=1e-2, per_device_train_batch_size=8, dataset="bbbb (20 rows)",
                        num_processes=2, output_dir="/elsewhere", resume_from_checkpoint="true", local_rank=1)
    with pytest.raises(UserError) as caught:
        check_resume(tmp_path, changed, "ckpt-100", "rm")
    message = str(caught.value)
    assert "\n" not in message
    for part in ("dataset aaaa (40 rows) → bbbb (20 rows)", "learning_rate 5e-05 → 0.01", "num_processes 1 → 2",
                 "per_device_train_batch_size 4 → 8",
                 "--allow_changed_args dataset learning_rate num_processes per_device_train_batch_size"):
        assert part in message
    for implied in ("output_dir", "resume_from_checkpoint", "local_rank"):  # what the resume itself implies
        assert implied not in message.split("(")[1].split(")")[0]
    # a shorter run is not "longer"; evaluation cadence decides the result when the best checkpoint is kept
    with pytest.raises(UserError, match="max_steps 100 → 50"):
        check_resume(tmp_path, _identity(max_steps=50), "ckpt-100", "rm")
    best = tmp_path / "best"
    check_resume(best, _identity(load_best_model_at_end=True), None, "rm")
    with pytest.raises(UserError, match="eval_steps 50 → 10"):
        check_resume(best, _identity(load_best_model_at_end=True, eval_steps=10), "ckpt-100", "rm")


def test_safe_set_and_allowed_fields_resume_and_are_recorded_in_run_info(tmp_path):
    out = StageOutput(tmp_path / "run", stage="rm")
    fake_weights(out.staging)
    out.check_identity(None, _identity())
    resumed = StageOutput(tmp_path / "run", stage="rm", resume=True)
    safe = _identity(max_steps=200, num_train_epochs=5.0, logging_steps=1, save_steps=7, eval_steps=3,
                     report_to=["tensorboard"])
    resumed.check_identity("checkpoint-100", safe)
    with pytest.raises(UserError, match="learning_rate 5e-05 → 0.0001"):
        resumed.check_identity("checkpoint-150", {**safe, "arguments": {**safe["arguments"], "learning_rate": 1e-4}})
    configure(allow_changed_args=["learning_rat"])
    with pytest.raises(UserError, match="unknown field.*learning_rat"):
        resumed.check_identity("checkpoint-150", {**safe, "arguments": {**safe["arguments"], "learning_rate": 1e-4}})
    configure(allow_changed_args=["learning_rate"])
    resumed.check_identity("checkpoint-150", {**safe, "arguments": {**safe["arguments"], "learning_rate": 1e-4}})
    final = resumed.finalize({}, {})
    history = json.loads((final / "run_info.json").read_text())["history"]
    assert history["identity"] == {"dataset": "aaaa (40 rows)", "model": "m1", "tokenizer": "t1", "num_processes": 1,
                                   "toolkit_version": "0.1.0"}
    start, first, second = history["events"]
    assert start["event"] == "start" and first["resumed_from"] == "checkpoint-100"
    assert first["changed_safe"] == {"eval_steps": [50, 3], "logging_steps": [10, 1], "max_steps": [100, 200],
                                     "num_train_epochs": [3.0, 5.0], "report_to": [["none"], ["tensorboard"]],
                                     "save_steps": [50, 7]}
    assert first["changed_allowed"] == {}
    # compared with the identity recorded last (the first resume's): only the learning rate differs now
    assert second["changed_safe"] == {} and second["resumed_from"] == "checkpoint-150"
    assert second["changed_allowed"] == {"learning_rate": [5e-05, 0.0001]}
    assert not list(final.glob("run_identity*"))


def test_compare_identities_is_denylist_free():
    changes = compare_identities(_identity(), _identity(some_new_flag=1, gradient_accumulation_steps=2), "rm")
    assert set(changes["refused"]) == {"some_new_flag", "gradient_accumulation_steps"}
    generation = compare_identities(_identity(batch_size=8), _identity(batch_size=64), "generate")
    assert generation["safe"] == {"batch_size": [8, 64]}
    assert compare_identities(_identity(batch_size=8), _identity(batch_size=64), "ppo")["refused"]


def test_integrity_flags_are_parsed_by_every_stage_and_applied_process_wide():
    from rlhfkit import integrity
    from rlhfkit.cli import parse_args
    import rm_train

    base = ["--model_name_or_path", "m", "--dataset_path", "d", "--output_dir", "/tmp/x"]
    parsed = parse_args(rm_train.ARGUMENTS, [*base, "--verify_parent", "size", "--allow_changed_args", "seed", "lr"])
    assert len(parsed) == len(rm_train.ARGUMENTS)
    assert integrity.verify_mode() == "size" and integrity.allowed_changes() == ("seed", "lr")
    parse_args(rm_train.ARGUMENTS, base)
    assert integrity.verify_mode() == "full" and integrity.allowed_changes() == ()
    with pytest.raises(UserError, match="--verify_parent must be one of full, size, none"):
        parse_args(rm_train.ARGUMENTS, [*base, "--verify_parent", "fast"])
