"""rlhfkit.threads: a stage's thread count follows the hint file a chain script writes."""

import torch

from rlhfkit import threads


def test_thread_count_follows_the_hint_file(tmp_path, monkeypatch):
    previous = torch.get_num_threads()
    hint = tmp_path / "threads"
    try:
        monkeypatch.delenv(threads.ENV, raising=False)
        assert threads.follow() is None  # no hint: nothing changes
        monkeypatch.setenv(threads.ENV, str(hint))
        assert threads.follow() is None and torch.get_num_threads() == previous  # no file yet
        hint.write_text("2\n")
        assert threads.follow() == 2 and torch.get_num_threads() == 2
        hint.write_text("1")
        assert threads.follow() == 1 and torch.get_num_threads() == 1
        hint.write_text("garbage")
        assert threads.follow() is None and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def test_a_trainer_follows_the_hint_after_each_optimizer_step(tmp_path, monkeypatch):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    class Trainer:  # what follow_between_steps uses of an HF Trainer: add_callback
        def __init__(self):
            self.callbacks = []

        def add_callback(self, callback):
            self.callbacks.append(callback)

    monkeypatch.delenv(threads.ENV, raising=False)
    threads.follow_between_steps(quiet := Trainer())
    assert quiet.callbacks == []  # no hint file named: nothing installed
    previous = torch.get_num_threads()
    hint = tmp_path / "threads"
    hint.write_text("1")
    monkeypatch.setenv(threads.ENV, str(hint))
    trainer = Trainer()
    threads.follow_between_steps(trainer)
    try:
        (callback,) = trainer.callbacks
        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
        callback.on_step_end(args, TrainerState(), TrainerControl())
        assert torch.get_num_threads() == 1
        hint.write_text("2")
        callback.on_step_end(args, TrainerState(), TrainerControl())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
