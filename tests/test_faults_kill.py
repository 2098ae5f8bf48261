"""Kill anywhere: SIGKILL a stage at each moment of its run, check that nothing a later stage accepts was left, and
that `--resume_from_checkpoint true` ends with the same weights as the run that was never interrupted.

The stage runs in a forked child of this process (the libraries are imported already, so a kill costs no start-up);
each moment is a patch that runs the real step, then kills the child with SIGKILL, as `kill -9` or the OOM killer
would. Tiny model, 9 steps, checkpoints every 3.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from rlhfkit.checkpoints import check_parent
from rlhfkit.errors import UserError
from tests.conftest import sentiment_pairs, write_jsonl
from tests.test_faults_stages import TINY, point_loggers_at_stderr, run_in_process, weights_digest

pytestmark = pytest.mark.slow

RUN = ["--learning_rate", "1e-3", "--max_steps", "9", "--save_steps", "3", "--logging_steps", "3"]


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _after(owner, name: str, when=lambda *args, **kwargs: True):
    """Patch `owner.name` to run, then SIGKILL the process if `when(*args)` holds."""
    original = getattr(owner, name)

    def patched(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            _die()
        return result

    setattr(owner, name, patched if not isinstance(original, staticmethod) else staticmethod(patched))


def kill_during_data_loading():
    import rlhfkit.data

    _after(rlhfkit.data, "read_records")


def kill_mid_epoch():
    import rlhfkit.faults
    from transformers import TrainerCallback

    class KillAtStep5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                _die()

    original = rlhfkit.faults.install_fault_handlers

    def install(trainer, args=None):
        trainer.add_callback(KillAtStep5())
        return original(trainer, args)

    rlhfkit.faults.install_fault_handlers = install


def kill_while_writing_a_checkpoint():
    from transformers import Trainer

    # checkpoint-6 gets its weights and optimizer, not trainer_state.json: torn
    _after(Trainer, "_save_optimizer_and_scheduler", lambda self, output_dir: self.state.global_step == 6)


def kill_during_the_final_save():
    from transformers import Trainer

    # the final weights are written into OUT.partial, the tokenizer, log history and run_info.json are not
    _after(Trainer, "save_model", lambda self, output_dir=None, **kw: "checkpoint-" not in str(output_dir))


def kill_between_final_save_and_rename():
    import rlhfkit.checkpoints

    _after(rlhfkit.checkpoints, "write_json_atomic", lambda path, payload: Path(path).name == "run_info.json")


MOMENTS = {
    "data_loading": kill_during_data_loading,
    "mid_epoch": kill_mid_epoch,
    "checkpoint_write": kill_while_writing_a_checkpoint,
    "final_save": kill_during_the_final_save,
    "before_rename": kill_between_final_save_and_rename,
}


def run_killed(stage: str, argv: list[str], moment) -> None:
    """Run the stage in a forked child that `moment` kills; assert it died by SIGKILL."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            moment()
            from tests.test_faults_stages import _stage
            from rlhfkit.cli import run_stage

            main, types = _stage(stage)
            run_stage(main, types, argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code or 3)  # reaching here means the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child ended with status {status}"


def _data(tmp: Path, stage: str) -> Path:
    pairs = sentiment_pairs(48, seed=1)
    if stage == "sft_train":
        return write_jsonl(tmp / "sft.jsonl", [{"messages": row["prompt"] + row["chosen"]} for row in pairs])
    if stage == "prm_train":  # TRL's stepwise rows: the chosen response's words as steps, every other one wrong
        return write_jsonl(tmp / "steps.jsonl", [
            {"prompt": row["prompt"][0]["content"], "completions": row["chosen"][0]["content"].split()[:4],
             "labels": [i % 2 == 0 for i in range(len(row["chosen"][0]["content"].split()[:4]))]} for row in pairs])
    return write_jsonl(tmp / "pairs.jsonl", pairs)


def _argv(stage: str, data: Path, out: Path) -> list[str]:
    extra = ["--reward_stats_samples", "8"] if stage == "rm_train" else []
    return [*TINY, "--dataset_path", str(data), *RUN, *extra, "--output_dir", str(out)]


class _NoCapture:  # for run_in_process outside a test's capsys (the module fixture)
    def readouterr(self):
        import types

        return types.SimpleNamespace(out="", err="")


_REFERENCES: dict[str, tuple[Path, str]] = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """stage → (its data file, the uninterrupted run's final-weights digest), computed once per stage."""

    def get(stage: str) -> tuple[Path, str]:
        if stage not in _REFERENCES:
            tmp = tmp_path_factory.mktemp(f"kill-reference-{stage}")
            data = _data(tmp, stage)
            code, _ = run_in_process(stage, _argv(stage, data, tmp / "straight"), _NoCapture())
            assert code == 0
            _REFERENCES[stage] = (data, weights_digest(tmp / "straight"))
        return _REFERENCES[stage]

    return get


CASES = [("rm_train", moment) for moment in MOMENTS] + [
    ("sft_train", "data_loading"), ("sft_train", "checkpoint_write"),
    ("dpo_train", "checkpoint_write"),  # dpo_train makes OUT.partial before reading its data: no data_loading case
]


@pytest.mark.parametrize("stage,moment", CASES, ids=[f"{s.split('_')[0]}-{m}" for s, m in CASES])
def test_killed_anywhere_leaves_nothing_accepted_and_resumes_exactly(tmp_path, capsys, reference, stage, moment):
    data, digest = reference(stage)
    out = tmp_path / "out"
    partial = Path(f"{out}.partial")
    argv = _argv(stage, data, out)
    run_killed(stage, argv, MOMENTS[moment])

    assert not out.exists()
    for candidate in (out, partial):
        with pytest.raises(UserError):
            check_parent(candidate)
    checkpoints = {p.name: (p / "trainer_state.json").is_file() for p in partial.glob("checkpoints/checkpoint-*")}
    # the kill happened where it was meant to
    expected_state = {
        "data_loading": lambda: not partial.exists(),  # the staging dir appears only once the data is read and checked
        "mid_epoch": lambda: checkpoints == {"checkpoint-3": True},
        "checkpoint_write": lambda: checkpoints == {"checkpoint-3": True, "checkpoint-6": False},
        "final_save": lambda: (partial / "model.safetensors").is_file() and not (partial / "run_info.json").exists(),
        "before_rename": lambda: (partial / "run_info.json").is_file(),
    }[moment]
    assert expected_state(), (moment, checkpoints, sorted(p.name for p in partial.glob("*")))
    if moment != "data_loading":
        assert (partial / "LOCK").exists()  # a kill -9 cannot release its lock: the rerun must ask to take over
    if moment == "mid_epoch":
        code, err = run_in_process(stage, argv, capsys)
        assert code == 2 and "no longer running" in err and "--resume_from_checkpoint true" in err, err[-2000:]

    code, err = run_in_process(stage, [*argv, "--resume_from_checkpoint", "true"], capsys)
    assert code == 0, err[-3000:]
    if moment == "checkpoint_write":  # the torn checkpoint is named and skipped
        assert "checkpoint-6 is incomplete (interrupted while saving); not resuming from it" in err, err[-3000:]
    assert check_parent(out)["stage"] == stage.split("_")[0]
    assert weights_digest(out) == digest


# ---------------------------------------------------------------------------------------------------------------
# preemption: a real SIGTERM at step 5, then resume; every Trainer stage
# ---------------------------------------------------------------------------------------------------------------
def sigterm_at_step_5():
    from transformers.trainer_callback import CallbackHandler

    original = CallbackHandler.on_step_end

    def on_step_end(self, args, state, control):
        if state.global_step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster's preemption would: the handler runs at once
        return original(self, args, state, control)

    CallbackHandler.on_step_end = on_step_end


def run_forked(stage: str, argv: list[str], setup, stderr_file: Path) -> int:
    """Run the stage in a forked child after `setup()`, its stderr into `stderr_file`; return its exit code (or
    -signal)."""
    import sys

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            sys.stderr = open(stderr_file, "w", buffering=1)
            point_loggers_at_stderr()
            setup()
            from rlhfkit.cli import run_stage
            from tests.test_faults_stages import _stage

            main, types = _stage(stage)
            run_stage(main, types, argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)


@pytest.mark.parametrize("stage", ["rm_train", "sft_train", "dpo_train", "pm_train", "prm_train"])
def test_sigterm_checkpoints_at_the_step_and_resumes_exactly(tmp_path, capsys, reference, stage):
    """Every Trainer stage: SIGTERM at step 5 saves checkpoint-5 and exits 75; a resume with another learning rate
    is refused in one line (it would be another run); the same command resumes to the uninterrupted run's weights."""
    from rlhfkit.faults import EXIT_PREEMPTED

    data, digest = reference(stage)
    out = tmp_path / "out"
    argv = _argv(stage, data, out)
    code = run_forked(stage, argv, sigterm_at_step_5, tmp_path / "stderr.txt")
    assert code != -signal.SIGTERM, (f"{stage}.py died of SIGTERM: it does not call "
                                     f"rlhfkit.faults.install_fault_handlers(trainer, training_args) after building "
                                     f"its trainer")
    assert code == EXIT_PREEMPTED
    err = (tmp_path / "stderr.txt").read_text()
    lines = [line for line in err.splitlines() if line.startswith("preempted:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith("preempted: preempted by SIGTERM at step 5: checkpoint saved to") and lines[0].endswith(
        "rerun the same command with --resume_from_checkpoint true to continue"), lines
    checkpoint = Path(f"{out}.partial") / "checkpoints" / "checkpoint-5"
    assert (checkpoint / "trainer_state.json").is_file() and not out.exists()
    assert not (Path(f"{out}.partial") / "LOCK").exists()  # a preempted run ends cleanly: no stale lock
    code, err = run_in_process(stage, [*argv, "--resume_from_checkpoint", "true", "--learning_rate", "2e-3"], capsys)
    assert code == 2 and "this run is not the one that wrote" in err and "learning_rate 0.001 → 0.002" in err, err[-2000:]
    assert "Traceback" not in err and (checkpoint / "trainer_state.json").is_file()
    code, err = run_in_process(stage, [*argv, "--resume_from_checkpoint", "true"], capsys)
    assert code == 0, err[-3000:]
    assert weights_digest(out) == digest
