"""Faults in input files and in the output dir, without training: every reader turns every encoding fault into one
line naming the file and row (or byte offset); `--skip_invalid_rows` skips row-level faults only; one run per dir."""

from __future__ import annotations

import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlhfkit.checkpoints import StageOutput, release_all
from rlhfkit.locks import LOCK_FILE
from rlhfkit.data import load_preferences, read_records
from rlhfkit.errors import UserError
from rlhfkit.prompts import load_prompts
from rlhfkit.train.sft_data import load_sft
from tests.conftest import REPO

PAIR = {"prompt": "Q", "chosen": "A", "rejected": "B"}
SFT = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
GEN = {"id": "p1", "prompt": [{"role": "user", "content": "Q"}], "responses": ["a", "b"]}


def _lines(*rows) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def _pair(i: int) -> dict:
    return {"prompt": f"Q{i}", "chosen": f"A{i}", "rejected": f"B{i}"}


# ---------------------------------------------------------------------------------------------------------------
# the faults, one file each
# ---------------------------------------------------------------------------------------------------------------
def make_fault(tmp_path, kind: str, row: dict):
    """A damaged file of `kind` holding copies of `row`; returns (path, expected message regex)."""
    good = _lines(row, row)
    if kind == "utf8":
        path = tmp_path / "bad.jsonl"
        path.write_bytes(good + b'{"prompt": "caf\xe9"}\n')
        return path, r"bad\.jsonl: row 3: not valid UTF-8 \(byte \d+"
    if kind == "utf8_gz":
        path = tmp_path / "bad.jsonl.gz"
        path.write_bytes(gzip.compress(good + b'{"prompt": "\xff\xfe"}\n'))
        return path, r"bad\.jsonl\.gz: row 3: not valid UTF-8 \(byte \d+ of the decompressed file"
    if kind == "truncated_gz":
        path = tmp_path / "bad.jsonl.gz"
        data = gzip.compress(good * 200)
        path.write_bytes(data[: len(data) // 2])
        return path, r"bad\.jsonl\.gz: byte offset \d+ of the decompressed data, after row \d+: the gzip data ends early"
    if kind == "corrupt_gz":
        path = tmp_path / "bad.jsonl.gz"
        data = bytearray(gzip.compress(good * 50))
        data[20:40] = b"\x00" * 20
        path.write_bytes(bytes(data))
        return path, r"bad\.jsonl\.gz: byte offset \d+ of the decompressed data, after row \d+: the gzip data is damaged"
    if kind == "not_gz":
        path = tmp_path / "bad.jsonl.gz"
        path.write_bytes(good)
        return path, r"bad\.jsonl\.gz: .*the gzip data is damaged \(Not a gzipped file"
    if kind == "torn":
        path = tmp_path / "bad.jsonl"
        path.write_bytes(good + json.dumps(row).encode()[:7])
        return path, r"bad\.jsonl: row 3: the last line is cut short"
    if kind == "not_parquet":
        path = tmp_path / "bad.parquet"
        path.write_bytes(good)
        return path, r"bad\.parquet: not a readable parquet file \(pyarrow: "
    if kind == "truncated_parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "bad.parquet"
        pq.write_table(pa.Table.from_pylist([{"text": json.dumps(row)}] * 20), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 30])
        return path, r"bad\.parquet: not a readable parquet file \(pyarrow: "
    if kind == "json_utf8":
        path = tmp_path / "bad.json"
        path.write_bytes(b"[\n" + json.dumps(row).encode() + b',\n{"prompt": "\xc3("}]')
        return path, r"bad\.json: line 3 \(byte \d+\): not valid UTF-8"
    if kind == "json_truncated":
        path = tmp_path / "bad.json"
        path.write_bytes(json.dumps([row, row]).encode()[:-9])
        return path, r"bad\.json: line 1: the file ends early"
    if kind == "save_to_disk":
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_list([row] * 4).save_to_disk(str(path))
        for arrow in path.glob("*.arrow"):
            arrow.write_bytes(b"not arrow at all")
        return path, r"saved: not a readable save_to_disk dataset"
    raise AssertionError(kind)


FILE_FAULTS = ["truncated_gz", "corrupt_gz", "not_gz", "not_parquet", "truncated_parquet", "json_utf8",
               "json_truncated", "save_to_disk"]
ROW_FAULTS = ["utf8", "utf8_gz", "torn"]


def _one_line(exc: UserError) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("kind", ROW_FAULTS + FILE_FAULTS)
def test_read_records_names_file_and_place(tmp_path, kind):
    path, expected = make_fault(tmp_path, kind, PAIR)
    with pytest.raises(UserError) as caught:
        read_records(path)
    assert __import__("re").search(expected, _one_line(caught.value)), str(caught.value)


@pytest.mark.parametrize("kind", FILE_FAULTS)
def test_skip_invalid_rows_does_not_skip_file_faults(tmp_path, kind):
    path, expected = make_fault(tmp_path, kind, PAIR)
    with pytest.raises(UserError, match=expected):
        load_preferences([str(path)], skip_invalid=True)


@pytest.mark.parametrize("kind,counter", [("utf8", "skipped_invalid_utf8"), ("utf8_gz", "skipped_invalid_utf8"),
                                          ("torn", "skipped_torn_last_line")])
def test_skip_invalid_rows_skips_and_counts_row_faults(tmp_path, kind, counter):
    path, _ = make_fault(tmp_path, kind, PAIR)
    data = load_preferences([str(path)], skip_invalid=True)
    report = data.report[str(path)]
    assert report[counter] == 1 and report["read"] == 3
    assert len(data.rows) == 2 and report["kept"] == 2


def test_invalid_json_line_is_a_row_fault(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(_lines(_pair(1)) + b'{"prompt": \n' + _lines(_pair(2)) + b"[1, 2]\n")
    with pytest.raises(UserError, match=r"p\.jsonl: row 2: not valid JSON .*--skip_invalid_rows"):
        read_records(path)
    data = load_preferences([str(path)], skip_invalid=True)
    assert len(data.rows) == 2
    assert data.report[str(path)]["skipped_invalid_json"] == 1 and data.report[str(path)]["skipped_not_object"] == 1


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _lines(_pair(1)))
    assert read_records(path) == [_pair(1)]


# every loader goes through the one reader: the same fault gives the same line from each
def _load_prompts(path, skip):
    return load_prompts([str(path)], skip_invalid=skip)


def _load_sft(path, skip):
    return load_sft([str(path)], skip_invalid=skip)


def _load_pairs(path, skip):
    return load_preferences([str(path)], skip_invalid=skip)


def _load_generations(path, skip):
    from annotate.build_pairs import read_rows

    return read_rows(str(path), need_rewards=False)


LOADERS = [(_load_pairs, PAIR), (_load_prompts, {"prompt": "Q"}), (_load_sft, SFT), (_load_generations, GEN)]


@pytest.mark.parametrize("kind", ["utf8", "truncated_gz", "torn", "not_parquet"])
@pytest.mark.parametrize("loader,row", LOADERS, ids=["pairs", "prompts", "sft", "generations"])
def test_every_loader_gives_the_one_line(tmp_path, loader, row, kind):
    path, expected = make_fault(tmp_path, kind, row)
    with pytest.raises(UserError, match=expected):
        loader(path, False)


@pytest.mark.parametrize("loader,row", LOADERS[:3], ids=["pairs", "prompts", "sft"])
def test_every_loader_skips_row_faults_when_asked(tmp_path, loader, row):
    path, _ = make_fault(tmp_path, "utf8", dict(row, id="x") if loader is _load_prompts else row)
    loaded = loader(path, True)
    rows = loaded.rows if hasattr(loaded, "rows") else loaded
    assert len(rows) >= 1


def test_directory_reader_names_the_damaged_member(tmp_path):
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(_lines(_pair(1)))
    path, expected = make_fault(folder, "truncated_gz", PAIR)
    with pytest.raises(UserError, match=r"dir/" + expected):
        read_records(folder)


def test_file_vanishing_while_a_directory_is_read(tmp_path, monkeypatch):
    import rlhfkit.files as data  # the reader lives in rlhfkit.files

    folder = tmp_path / "dir"
    folder.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (folder / name).write_bytes(_lines(_pair(1)))
    real_open = data._open_binary

    def vanishing(path):
        if path.name == "b.jsonl":
            path.unlink()  # listed, then removed before it is opened
        return real_open(path)

    monkeypatch.setattr(data, "_open_binary", vanishing)
    with pytest.raises(UserError, match=r"b\.jsonl: the file disappeared while being read"):
        read_records(folder)


def test_read_error_mid_file_names_the_row(tmp_path, monkeypatch):
    import rlhfkit.files as data  # the reader lives in rlhfkit.files

    path = tmp_path / "p.jsonl"
    path.write_bytes(_lines(_pair(1), _pair(2)))

    class FailingHandle:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            yield _lines(_pair(1))
            raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(data, "_open_binary", lambda p: FailingHandle())
    with pytest.raises(UserError, match=r"p\.jsonl: row 2: cannot read \(Stale file handle\)"):
        read_records(path)


def test_generation_shard_reader_names_faults(tmp_path):
    from generation.shards import merge_shards, read_rows

    shard = tmp_path / "shard.jsonl"
    shard.write_bytes(_lines(GEN) + b'{"id": "\xff"}\n' + _lines(GEN))
    with pytest.raises(UserError, match=r"shard\.jsonl: row 2: damaged line in a generation shard: not valid UTF-8"):
        read_rows(shard)
    with pytest.raises(UserError, match=r"missing\.jsonl: the shard file disappeared"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "shard-00000-of-00001.done.json").write_text('{"index": 0, "assig')
    with pytest.raises(UserError, match=r"done\.json: unreadable shard record"):
        merge_shards(tmp_path, 1)


# ---------------------------------------------------------------------------------------------------------------
# one run per directory
# ---------------------------------------------------------------------------------------------------------------
HOLD = """
import sys, time
from rlhfkit.checkpoints import StageOutput
from rlhfkit.locks import RunLock
if sys.argv[1] == "stage":
    out = StageOutput(sys.argv[2], stage="rm")
else:
    RunLock(sys.argv[2], what="shard writer").acquire(takeover=True)
print("locked", flush=True)
time.sleep(120)
"""


def _holder(kind: str, path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_on_a_dir_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = _holder("stage", out)
    try:
        record = json.loads((tmp_path / "run.partial" / LOCK_FILE).read_text())
        assert record["pid"] == holder.pid and record["host"] and record["started"] and record["stage"] == "rm"
        for kwargs in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(UserError, match=rf"another run is writing .*pid {holder.pid} on host "):
                StageOutput(out, stage="rm", **kwargs)
        assert (tmp_path / "run.partial" / "INCOMPLETE").exists()  # the holder's dir was not touched
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (kill -9 leaves its LOCK file): reported, taken over only when asked
    with pytest.raises(UserError, match=rf"LOCK: a previous rm run \(pid {holder.pid} .*no longer running.*"
                                        r"--resume_from_checkpoint true"):
        StageOutput(out, stage="rm")
    taken = StageOutput(out, stage="rm", resume=True)
    assert json.loads((taken.staging / LOCK_FILE).read_text())["pid"] == os.getpid()
    taken.finalize({}, {})
    assert not (out / LOCK_FILE).exists() and "LOCK" not in json.loads((out / "run_info.json").read_text())["files"]


def test_stage_that_fails_early_leaves_nothing_and_no_lock(tmp_path):
    out = StageOutput(tmp_path / "run", stage="sft")
    assert (out.staging / LOCK_FILE).exists()
    release_all(failed=True)
    assert not out.staging.exists()
    kept = StageOutput(tmp_path / "kept", stage="sft")
    (kept.checkpoints / "checkpoint-2").mkdir(parents=True)
    release_all(failed=True)
    assert kept.staging.exists() and not (kept.staging / LOCK_FILE).exists()  # checkpoints are kept for resuming


def test_two_writers_of_one_generation_shard(tmp_path):
    from generation.shards import ShardFile

    shard = ShardFile(tmp_path, 0, 2)
    holder = _holder("lock", shard.lock_path)
    try:
        with pytest.raises(UserError, match=rf"another generation process for shard 0 of 2 is writing .*pid {holder.pid}"):
            shard.open_for_append()
        ShardFile(tmp_path, 1, 2).open_for_append()  # another shard of the same run is fine
    finally:
        holder.kill()
        holder.wait()
    assert shard.open_for_append() == []  # a killed writer's lock is taken over: a rerun resumes the shard
    shard.close()
    assert not shard.lock_path.exists()


# ---------------------------------------------------------------------------------------------------------------
# preemption and divergence machinery (stage runs: tests/test_faults_stages.py)
# ---------------------------------------------------------------------------------------------------------------
def test_preemption_guard_flags_the_first_signal(tmp_path):
    from rlhfkit.faults import EXIT_PREEMPTED, Preempted, PreemptionGuard, parse_signals

    assert parse_signals("SIGTERM,usr1") == [signal.SIGTERM, signal.SIGUSR1] and parse_signals("none") == []
    with pytest.raises(UserError, match="SIGKILL"):
        parse_signals("SIGKILL")
    guard = PreemptionGuard("SIGUSR1")
    try:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert guard.requested and guard.stop_requested()
        with pytest.raises(Preempted) as caught:
            guard.exit(7, tmp_path / "checkpoint-7")
        assert caught.value.code == EXIT_PREEMPTED and "at step 7" in str(caught.value)
        assert "--resume_from_checkpoint true" in str(caught.value)
    finally:
        guard.uninstall()
    assert signal.getsignal(signal.SIGUSR1) != guard._handle  # uninstalled on exit


def test_custom_loop_saves_then_exits_when_signalled(tmp_path):
    from rlhfkit.faults import Preempted, PreemptionGuard

    saved = []
    guard = PreemptionGuard("SIGUSR1")
    try:
        guard.save_and_exit_if_requested(3, lambda: saved.append(3), tmp_path / "checkpoint-3")
        assert saved == []  # no signal: nothing happens
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        with pytest.raises(Preempted, match=r"by SIGUSR1 at step 4: checkpoint saved to .*checkpoint-4"):
            guard.save_and_exit_if_requested(4, lambda: saved.append(4), tmp_path / "checkpoint-4")
        assert saved == [4]
    finally:
        guard.uninstall()


def test_generation_flushes_the_batch_then_stops(tmp_path):
    from generation.shards import ShardFile, read_rows
    from rlhfkit.faults import Preempted

    shard = ShardFile(tmp_path, 0, 1)
    shard.open_for_append()
    shard.append([dict(GEN, id="a")])
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the next batch is generated
    time.sleep(0.05)
    with pytest.raises(Preempted, match=r"after 2 rows of shard 0 were written .*rerun the same command"):
        shard.append([dict(GEN, id="b")])
    assert [row["id"] for row in read_rows(shard.path)[0]] == ["a", "b"] and not shard.lock_path.exists()


def test_divergence_and_disk_messages(tmp_path):
    import torch

    from rlhfkit.faults import check_finite, disk_error_message

    check_finite(torch.tensor(0.5), 3)
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-6").mkdir()  # torn: not a resumable checkpoint
    with pytest.raises(UserError, match=r"non-finite loss \(nan\) at step 6; .*checkpoint-4, is from before it"):
        check_finite(torch.tensor(float("nan")), 6, tmp_path)
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.safetensors"))
    assert disk_error_message(full, tmp_path).startswith(f"{tmp_path / 'x.safetensors'}: no space left on device")
    wrapped = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64: file write failed")
    assert disk_error_message(wrapped, tmp_path).startswith(f"{tmp_path}: no space left on device")
    denied = PermissionError(errno.EACCES, "Permission denied", "/ro/out.partial")
    assert disk_error_message(denied).startswith("/ro/out.partial: permission denied")
    assert disk_error_message(ValueError("something else")) is None


def test_run_stage_prints_disk_errors_as_one_line(tmp_path, capsys):
    from rlhfkit.cli import run_stage
    from dataclasses import dataclass

    @dataclass
    class Args:
        output_dir: str = str(tmp_path / "out")

    def main(args):
        out = StageOutput(args.output_dir, stage="rm")
        (out.checkpoints / "checkpoint-1").mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device", str(out.staging / "model.safetensors"))

    with pytest.raises(SystemExit) as caught:
        run_stage(main, (Args,), [])
    err = capsys.readouterr().err.strip().splitlines()
    assert caught.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {tmp_path / 'out.partial' / 'model.safetensors'}: no space left on device")
    assert (tmp_path / "out.partial" / "checkpoints" / "checkpoint-1").is_dir()  # the last checkpoint is kept
    assert not (tmp_path / "out.partial" / LOCK_FILE).exists()
