"""Integrity under faults with several processes: one of two DDP ranks SIGKILLed mid-epoch, a 2-process run
preempted by SIGTERM to its launcher, a damaged checkpoint skipped and a changed run refused on resume; and one
merger at a time on a generation output (the output lock).

The 2-process runs are real `accelerate launch --config_file configs/accelerate/ddp.yaml` runs of rm_train.py (two
CPU processes over gloo), tiny model, 12 steps of 4 pairs per rank, constant learning rate.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhfkit.checkpoints import StageOutput
from rlhfkit.errors import UserError
from tests.conftest import REPO, sentiment_pairs, write_jsonl
from tests.test_faults_stages import weights_digest

STEPS = 12
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
          "--num_processes", "2", "--monitor_interval", "0.5", "rm_train.py"]


def _argv(data: Path, out: Path) -> list[str]:
    return ["--model_name_or_path", "tiny-random-llama", "--dataset_path", str(data), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--save_steps", "2", "--save_total_limit", "3", "--logging_steps", "2",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
            "--seed", "0", "--report_to", "none", "--disable_tqdm", "true"]


def _run(argv: list[str], timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCH, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _sealed(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1])
                  for p in Path(f"{out}.partial/checkpoints").glob("checkpoint-*/checksums.json"))


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path, count: int = 1, deadline_s=600) -> None:
    deadline = time.time() + deadline_s
    while len(_sealed(out)) < count:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.05)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"rank {rank} not found under the launcher")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(tmp / "train.jsonl", sentiment_pairs(64, seed=3))
    out = tmp / "whole"
    done = _run(_argv(data, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return data, weights_digest(out)


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_and_the_resume_ends_with_the_same_weights(tmp_path, uninterrupted):
    data, expected = uninterrupted
    out = tmp_path / "rm"
    proc = _start(_argv(data, out))
    _wait_for_checkpoint(proc, out, count=2)
    os.kill(_rank_pid(proc, 1), signal.SIGKILL)  # mid-epoch: 64 pairs are 8 steps of 8
    killed_at = time.time()
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0 and time.time() - killed_at < 30
    # torch elastic's failure report names the dead rank: "rank : 1 (local_rank: 1)" … "Signal 9 (SIGKILL)"
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", stderr) and "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    assert not out.exists() and _sealed(out)

    # one byte of the newest checkpoint damaged: skipped by name, the one before it is used
    *_, previous, newest_step = _sealed(out)
    newest = Path(f"{out}.partial/checkpoints/checkpoint-{newest_step}")
    weights = newest / "model.safetensors"
    data_bytes = bytearray(weights.read_bytes())
    data_bytes[-1] ^= 0x01
    weights.write_bytes(bytes(data_bytes))
    resumed = _run([*_argv(data, out), "--resume_from_checkpoint", "true", "--logging_steps", "1"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{weights}: damaged: sha256" in resumed.stderr and "not resuming from it" in resumed.stderr
    assert weights_digest(out) == expected
    events = json.loads((out / "run_info.json").read_text())["history"]["events"]
    assert [e["event"] for e in events] == ["start", "resume"]
    assert events[1]["changed_safe"] == {"logging_steps": [2, 1]}
    assert events[1]["resumed_from"].endswith(f"checkpoint-{previous}")


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_one_consistent_checkpoint_and_resumes_to_the_same_weights(tmp_path,
                                                                                                 uninterrupted):
    data, expected = uninterrupted
    out = tmp_path / "rm"
    proc = _start(_argv(data, out))
    _wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGTERM)  # to the launcher only; torch elastic passes it to both ranks
    stderr = proc.communicate(timeout=120)[1]
    preempted = [line for line in stderr.splitlines() if line.startswith("preempted: ")]
    assert len(preempted) == 1, stderr[-3000:]  # one line, from the main rank
    step = int(preempted[0].split(" at step ")[1].split(":")[0])
    checkpoint = Path(f"{out}.partial/checkpoints/checkpoint-{step}")
    # consistent: sealed after both ranks wrote their files, and every file still matches its checksum
    files = json.loads((checkpoint / "checksums.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(files)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step < STEPS
    # the workers exit 75 (EX_TEMPFAIL) after the checkpoint; `accelerate launch` (torch elastic) re-raises the
    # signal it received as its own failure, exit 1: the `preempted:` line is what tells a preemption apart
    assert proc.returncode != 0

    # a resume with different results refused in one line; then the same run resumes to the same weights
    changed = _run([*_argv(data, out), "--resume_from_checkpoint", "true", "--learning_rate", "1e-2"])
    assert changed.returncode != 0 and "learning_rate 0.001 → 0.01" in changed.stderr
    resumed = _run([*_argv(data, out), "--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert weights_digest(out) == expected


def test_a_second_merge_of_one_generation_output_is_refused_naming_the_first(tmp_path):
    from generation import merge_data

    out = tmp_path / "gen"
    staging = StageOutput(out, "generate", resume=True).staging
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rlhfkit.checkpoints import RunLock; "
         f"RunLock({str(staging / 'LOCK')!r}, 'generate merge').acquire(False, stage='generate merge'); "
         "print('held', flush=True); time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"another run is writing this output dir \(pid {holder.pid} .*stage generate merge"):
            merge_data.main(merge_data.ScriptArguments(output_dir=str(out), world_size=2))
    finally:
        holder.kill()
        holder.wait()
