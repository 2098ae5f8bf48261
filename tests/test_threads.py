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
