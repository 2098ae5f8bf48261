"""Faults met by whole stages on tiny models: bad input writes nothing, preemption resumes to the same weights, a
non-finite loss stops at its step and leaves the last checkpoint resumable, an unwritable output dir is one line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhfkit.cli import run_stage
from tests.conftest import REPO, sentiment_pairs, write_jsonl

pytestmark = pytest.mark.slow


def _stage(name: str):
    import importlib

    module = importlib.import_module(name)
    return module.main, module.ARGUMENTS


def point_loggers_at_stderr() -> None:
    """Library loggers (transformers, datasets) keep the stderr of the test that first used them, which capsys has
    closed since: point them at the current one."""
    import logging

    for logger in [logging.getLogger(), *logging.root.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr
                if "flush" in vars(handler):  # transformers pins `flush` to the stderr of its first use
                    handler.flush = sys.stderr.flush


def run_in_process(name: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run a stage through its real entry point (`run_stage`) in this process; return (exit code, stderr)."""
    main, types = _stage(name)
    point_loggers_at_stderr()
    code = 0
    try:
        run_stage(main, types, argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


TINY = ["--model_name_or_path", "tiny-random-llama", "--report_to", "none", "--use_cpu", "true",
        "--disable_tqdm", "true", "--per_device_train_batch_size", "4", "--seed", "0"]


def weights_digest(model_dir: Path) -> str:
    from safetensors.torch import load_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# bad input writes nothing, in every stage
# ---------------------------------------------------------------------------------------------------------------
def _bad_inputs(tmp_path: Path, stage: str) -> dict[str, tuple[Path, str]]:
    import gzip

    row = ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
           if stage == "sft_train" else {"prompt": "Q", "chosen": "A", "rejected": "B"})
    good = (json.dumps(row) + "\n").encode() * 8
    utf8 = tmp_path / "utf8.jsonl"
    utf8.write_bytes(good + b'{"prompt": "caf\xe9"}\n')
    truncated = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(good * 40)
    truncated.write_bytes(data[: len(data) // 2])
    bad_row = tmp_path / "row.jsonl"
    bad_row.write_bytes(good + (b'{"messages": [{"role": "bot", "content": "x"}]}\n' if stage == "sft_train"
                                else b'{"prompt": "Q", "chosen": "", "rejected": "B"}\n'))
    return {"utf8": (utf8, "utf8.jsonl: row 9: not valid UTF-8"),
            "gzip": (truncated, "cut.jsonl.gz: byte offset"),
            "row": (bad_row, "row.jsonl: row 9")}


@pytest.mark.parametrize("stage", ["rm_train", "sft_train", "dpo_train"])
def test_bad_input_writes_nothing(tmp_path, capsys, stage):
    for kind, (path, expected) in _bad_inputs(tmp_path, stage).items():
        out = tmp_path / f"out-{kind}"
        code, err = run_in_process(stage, [*TINY, "--dataset_path", str(path), "--output_dir", str(out)], capsys)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (stage, kind, err[-2000:])
        assert "Traceback" not in err, err
        assert not out.exists() and not Path(f"{out}.partial").exists(), (stage, kind, "left a directory behind")


def test_unwritable_output_dir_is_one_line(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(8, seed=1))
    code, err = run_in_process("rm_train", [*TINY, "--dataset_path", str(train), "--output_dir",
                                            "/sys/rlhfkit-test-out", "--max_steps", "1"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith("error: /sys/rlhfkit-test-out.partial: operation not permitted"), lines


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys):
    """A real ENOSPC: the output dir on a 3 MB tmpfs (needs root to mount; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        train = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(32, seed=1))
        code, err = run_in_process("rm_train", [*TINY, "--dataset_path", str(train), "--output_dir", str(disk / "rm"),
                                                "--max_steps", "12", "--save_steps", "2", "--save_total_limit", "10",
                                                "--reward_stats_samples", "8"], capsys)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
        assert "no space left on device; nothing was accepted; the last complete checkpoint" in lines[0], lines
        last = lines[0].split("the last complete checkpoint, ")[1].split(",")[0]
        assert (Path(last) / "trainer_state.json").is_file() and not (disk / "rm").exists()
        assert not (disk / "rm.partial" / "LOCK").exists()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ---------------------------------------------------------------------------------------------------------------
# preemption: SIGTERM mid-run, then resume, gives the uninterrupted run's weights
# ---------------------------------------------------------------------------------------------------------------
RM_RUN = ["--learning_rate", "1e-3", "--max_steps", "40", "--save_steps", "1000", "--logging_steps", "1",
          "--reward_stats_samples", "8"]


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the stage ended (code {proc.returncode}) before the signal could be sent"
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_sigterm_saves_a_checkpoint_and_resume_gives_the_same_weights(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(64, seed=1))
    common = [*TINY, "--dataset_path", str(train), *RM_RUN]
    code, err = run_in_process("rm_train", [*common, "--output_dir", str(tmp_path / "straight")], capsys)
    assert code == 0, err[-2000:]

    out = tmp_path / "preempted"
    argv = [sys.executable, "rm_train.py", *common, "--output_dir", str(out)]
    log = tmp_path / "stdout.txt"
    with open(log, "w") as stdout:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=stdout, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: "'loss'" in log.read_text(), proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("preempted:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    checkpoints = sorted((out.parent / f"{out.name}.partial" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    step = int(checkpoints[0].name.split("-")[1])
    assert 0 < step < 40 and f"at step {step}" in lines[0] and "--resume_from_checkpoint true" in lines[0]
    assert not out.exists() and not (out.parent / f"{out.name}.partial" / "LOCK").exists()

    code, err = run_in_process("rm_train", [*common, "--output_dir", str(out), "--resume_from_checkpoint", "true"],
                               capsys)
    assert code == 0, err[-2000:]
    state = json.loads((out / "checkpoints" / checkpoints[0].name / "trainer_state.json").read_text())
    assert state["global_step"] == step
    assert weights_digest(out) == weights_digest(tmp_path / "straight")


# ---------------------------------------------------------------------------------------------------------------
# a non-finite loss stops at its step; the last checkpoint before it resumes
# ---------------------------------------------------------------------------------------------------------------
def test_nonfinite_loss_stops_naming_the_step(tmp_path, capsys, monkeypatch):
    from rlhfkit.train.reward_trainer import RewardModelTrainer

    train = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(32, seed=1))
    real_loss = RewardModelTrainer.compute_loss

    def diverging(self, model, inputs, return_outputs=False, **kwargs):
        result = real_loss(self, model, inputs, return_outputs=return_outputs, **kwargs)
        if not model.training or self.state.global_step != 4:  # diverge in the 5th optimizer step only
            return result
        return (result[0] * float("nan"), result[1]) if return_outputs else result * float("nan")

    monkeypatch.setattr(RewardModelTrainer, "compute_loss", diverging)
    out = tmp_path / "rm"
    common = [*TINY, "--dataset_path", str(train), "--learning_rate", "1e-3", "--max_steps", "8", "--save_steps", "2",
              "--reward_stats_samples", "8", "--output_dir", str(out)]
    code, err = run_in_process("rm_train", common, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "non-finite loss (nan) at step 5" in lines[0] and "checkpoint-4" in lines[0], lines
    partial = tmp_path / "rm.partial" / "checkpoints"
    assert sorted(p.name for p in partial.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # none of step 5
    monkeypatch.setattr(RewardModelTrainer, "compute_loss", real_loss)
    code, err = run_in_process("rm_train", [*common, "--resume_from_checkpoint", "true"], capsys)
    assert code == 0 and (out / "run_info.json").is_file(), err[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# generation: a preemption flushes the batch in progress; the rerun continues after it
# ---------------------------------------------------------------------------------------------------------------
def test_generation_preempted_flushes_then_resumes_to_the_same_rows(tmp_path, monkeypatch):
    import rlhfkit.sampling as sampling
    from generation import generate
    from rlhfkit.faults import EXIT_PREEMPTED, Preempted
    from tests.test_generation import PROMPTS, args_for, read

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS), encoding="utf-8")
    generate.main(args_for(str(prompts), tmp_path / "full"))
    real, calls = sampling.generate_batch, []

    def preempted_during_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the batch is being generated
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate_batch", preempted_during_second_batch)
    out = tmp_path / "preempted"
    with pytest.raises(Preempted) as caught:
        generate.main(args_for(str(prompts), out))
    assert caught.value.code == EXIT_PREEMPTED and "rerun the same command" in str(caught.value)
    shard = tmp_path / "preempted.partial" / "shard-00000-of-00001.jsonl"
    assert len(read(shard)) == 4 and len(calls) == 2  # both batches written, no third one started
    assert not shard.with_suffix(".lock").exists() and not out.exists()
    monkeypatch.setattr(sampling, "generate_batch", real)
    generate.main(args_for(str(prompts), out))
    assert read(out / "generations.jsonl") == read(tmp_path / "full" / "generations.jsonl")
