"""One run per directory: an exclusive lock file held for the life of the process (`RunLock`), used by
`rlhfkit.checkpoints.StageOutput` on `OUT.partial/LOCK` and by generation shards on their own shard files."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path

from .errors import UserError
from .files import default_file_mode

logger = logging.getLogger(__name__)

LOCK_FILE = "LOCK"
# Stages whose processes legitimately share one OUT.partial: generation shards (one process per --local_index)
# append to their own shard files, and each process locks its own shard file instead (generation/shards.py).
SHARED_STAGES = frozenset({"generate"})
_HELD: dict[str, "RunLock"] = {}  # lock path → the lock this process holds


class RunLock:
    """An exclusive lock on a file, held by an open descriptor (`flock`) for the life of the process.

    The kernel drops the flock when its process dies (kill -9 included), so a lock file whose flock can be taken is
    stale: its writer is gone. The file's content says who held it: pid, host, start time, command (JSON).
    `release` unlinks the file, so a leftover file always means the writer did not end cleanly.
    """

    def __init__(self, path: str | os.PathLike, what: str = "run"):
        self.path = Path(os.path.abspath(path))  # one key per file in _HELD, however the path was spelled
        self.what = what
        self._fd: int | None = None

    @staticmethod
    def describe(holder: dict | None) -> str:
        if not holder:
            return "holder unknown (empty lock file)"
        return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
                + (f", stage {holder['stage']}" if holder.get("stage") else ""))

    @staticmethod
    def read(path: str | os.PathLike) -> dict | None:
        try:
            text = Path(path).read_text(encoding="utf-8")
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def probe(path: str | os.PathLike) -> dict | None:
        """The holder record if a live process holds the lock at `path`, else None (no file, or stale)."""
        import fcntl

        path = Path(os.path.abspath(path))
        if str(path) in _HELD:
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return RunLock.read(path) or {}
        finally:
            os.close(fd)  # closing drops a flock we may just have taken
        return None

    def acquire(self, takeover: bool, takeover_hint: str = "", stage: str | None = None) -> None:
        """Take the lock. A live holder: refuse with one line naming it. A stale lock (its process gone): refuse
        unless `takeover`, then log it and take it over."""
        import fcntl
        import socket
        import sys

        key = str(self.path)
        if key in _HELD and _HELD[key]._fd is not None:  # this process holds it already (a later StageOutput)
            previous_owner = _HELD[key]
            self._fd, previous_owner._fd = previous_owner._fd, None
            _HELD[key] = self
            return
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, default_file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self.read(self.path)
                raise UserError(
                    f"{self.path.parent}: another {self.what} is writing here ({self.describe(holder)}; lock file "
                    f"{self.path}); wait for it to finish or choose another output path"
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # its holder released (unlinked) it between our open and flock: try again
                os.close(fd)
                continue
            previous = os.read(fd, 65536)
            if previous.strip():
                try:
                    holder = json.loads(previous)
                except ValueError:
                    holder = None
                if not takeover:
                    os.close(fd)
                    raise UserError(
                        f"{self.path}: a previous {self.what} ({self.describe(holder)}) is no longer running and did "
                        f"not end cleanly (killed?); {takeover_hint or 'rerun to take it over'}"
                    )
                logger.warning("%s: taking over the lock of a %s that is gone (%s)", self.path, self.what,
                               self.describe(holder))
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      "stage": stage, "command": " ".join(sys.argv)[:500]}
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
            os.fsync(fd)
            self._fd = fd
            _HELD[key] = self
            return
        raise UserError(f"{self.path}: could not take the lock (other processes keep taking and releasing it)")

    def moved_to(self, path: Path) -> None:
        """The directory holding the lock file was renamed: follow it."""
        _HELD.pop(str(self.path), None)
        self.path = Path(os.path.abspath(path))
        _HELD[str(self.path)] = self

    def release(self) -> None:
        if self._fd is None:
            return
        if _HELD.get(str(self.path)) is self:
            del _HELD[str(self.path)]
        try:
            self.path.unlink(missing_ok=True)  # unlink first, then drop the flock: a waiter retries on a new file
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def release_held() -> None:
    """Drop every lock this process holds (`rlhfkit.checkpoints.release_all`, when a stage ends)."""
    for held in list(_HELD.values()):
        held.release()
