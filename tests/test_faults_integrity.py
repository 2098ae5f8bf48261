"""Integrity under faults with several processes: one of two DDP ranks SIGKILLed mid-epoch, a 2-process run
preempted by SIGTERM to `python -m rlhfkit.launch` (exit 75), a damaged checkpoint skipped on resume; one process
under `accelerate launch` and under the wrapper; and one merger at a time on a generation output (the output lock).

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


def _start(argv: list[str], launch: list[str] = LAUNCH) -> subprocess.Popen:
    return subprocess.Popen([*launch, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
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
def test_sigterm_to_rlhfkit_launch_saves_one_consistent_checkpoint_exits_75_and_resumes_to_the_same_weights(
        tmp_path, uninterrupted):
    data, expected = uninterrupted
    out = tmp_path / "rm"
    # `python -m rlhfkit.launch` is `accelerate launch` that hands the notice to the ranks itself and exits 75
    proc = _start(_argv(data, out), launch=[sys.executable, "-m", "rlhfkit.launch", *LAUNCH[3:]])
    _wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGTERM)  # to the wrapper only, as a scheduler's notice
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 75, stderr[-3000:]
    assert "rlhfkit.launch: SIGTERM sent to 2 training process(es)" in stderr
    preempted = [line for line in stderr.splitlines() if line.startswith("preempted: ")]
    assert len(preempted) == 1, stderr[-3000:]  # one line, from the main rank
    step = int(preempted[0].split(" at step ")[1].split(":")[0])
    checkpoint = Path(f"{out}.partial/checkpoints/checkpoint-{step}")
    # consistent: sealed after both ranks wrote their files, and every file still matches its checksum
    files = json.loads((checkpoint / "checksums.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(files)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step < STEPS

    # the same run resumes to the same weights (a changed one is refused: tests/test_checkpoints.py)
    resumed = _run([*_argv(data, out), "--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert weights_digest(out) == expected


WAITS_FOR_NOTICE = """
import sys, time
from rlhfkit.cli import run_stage
from rlhfkit.faults import PreemptionGuard

def main():
    guard = PreemptionGuard("SIGTERM,SIGUSR1")
    print("ready", flush=True)
    deadline = time.time() + 30
    while not guard.requested and time.time() < deadline:
        time.sleep(0.05)
    guard.exit(3, None)

run_stage(main, [], [])
"""


@pytest.mark.slow  # two launcher processes each (not a stage run, but seconds of process start-up)
@pytest.mark.parametrize("launcher", ["accelerate", "rlhfkit"])
def test_one_process_hears_the_notice_only_through_rlhfkit_launch(tmp_path, launcher):
    # `accelerate launch` with one process dies on SIGTERM and its stage never hears of it (it runs on, orphaned);
    # the wrapper hands the signal to the stage, which stops on it, and exits 75
    import psutil

    script = tmp_path / "stage.py"
    script.write_text(WAITS_FOR_NOTICE)
    module = "accelerate.commands.launch" if launcher == "accelerate" else "rlhfkit.launch"
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", module, "--num_processes", "1", "--num_machines", "1",
                                 "--mixed_precision", "no", "--dynamo_backend", "no", str(script)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            stage = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.cmdline()[1:] == [str(script)]]
            assert len(stage) == 1
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            if launcher == "rlhfkit":
                err.seek(0)
                stderr = err.read()
                assert code == 75 and "preempted: preempted by SIGTERM at step 3" in stderr, stderr[-3000:]
                assert not stage[0].is_running()
            else:
                assert code == -signal.SIGTERM and stage[0].is_running()  # the launcher is gone, the stage runs on
        finally:
            for child in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
                child.kill()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_second_merge_of_one_generation_output_is_refused_naming_the_first(tmp_path):
    from generation import merge_data

    out = tmp_path / "gen"
    staging = StageOutput(out, "generate", resume=True).staging
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rlhfkit.locks import RunLock; "
         f"RunLock({str(staging / 'LOCK')!r}, 'generate merge').acquire(False, stage='generate merge'); "
         "print('held', flush=True); time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"another run is writing this output dir \(pid {holder.pid} .*stage generate merge"):
            merge_data.main(merge_data.ScriptArguments(output_dir=str(out), world_size=2))
    finally:
        holder.kill()
        holder.wait()
