"""`accelerate launch` for preemptible jobs: the same arguments, but a preemption notice reaches the training
processes directly and the command exits 75 (EX_TEMPFAIL) when they stopped on it.

    python -m rlhfkit.launch [accelerate launch options] STAGE.py [stage flags]     (also: rlhfkit-launch …)

Why a wrapper (nothing in accelerate or torch elastic does this):
- `accelerate launch` with several processes is torch elastic's agent. On SIGTERM it forwards the signal to the
  ranks, kills those still running 30 s later, and then exits 1 re-raising the signal, whatever the ranks did. A
  scheduler (SLURM, Kubernetes) then cannot tell "saved a checkpoint, requeue me" from a crash, and a step plus a
  checkpoint save longer than 30 s is cut. With one process, `accelerate launch` dies on SIGTERM and the stage, its
  child, never hears of it.
- Here the preemption signals (`--preemption_signals`' default set: SIGTERM, SIGUSR1) are sent to the training
  processes themselves (the launcher's direct children), never to the launcher, so each rank saves at its next step
  boundary with no deadline but the scheduler's. A second notice is forwarded the same way (the ranks then stop at
  once, as `rlhfkit.faults` documents). SIGINT (Ctrl-C) goes to the launcher, which stops the ranks its own way.
- Each rank that stops on a preemption appends its one line to the file named by `RLHFKIT_PREEMPTED_FILE`
  (`rlhfkit.cli.run_stage`). When the launcher exits, that file decides: written → exit 75; otherwise the
  launcher's own exit status (128 + N when a signal N ended it).

The wrapper adds nothing else: every argument goes to `accelerate launch` unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .faults import DEFAULT_SIGNALS, EXIT_PREEMPTED, parse_signals

PREEMPTED_FILE_ENV = "RLHFKIT_PREEMPTED_FILE"


def record_preemption(message: str) -> None:
    """Called by a rank that stopped on a preemption notice: tell an enclosing `rlhfkit.launch` (if any)."""
    path = os.environ.get(PREEMPTED_FILE_ENV)
    if path:
        with open(path, "a") as fh:  # one short line per rank; appends of < PIPE_BUF bytes do not interleave
            fh.write(message.replace("\n", " ") + "\n")


def training_processes(launcher_pid: int) -> list[int]:
    """The launcher's direct children: torch elastic's ranks, or the single stage process of `simple_launcher`."""
    import psutil  # a dependency of accelerate

    try:
        return [child.pid for child in psutil.Process(launcher_pid).children(recursive=False)]
    except psutil.NoSuchProcess:
        return []


def launch(argv: list[str]) -> int:
    """Run `accelerate launch *argv`, forwarding preemption signals to the ranks; return the exit code."""
    forwarded = parse_signals(DEFAULT_SIGNALS)
    with tempfile.TemporaryDirectory(prefix="rlhfkit-launch-") as tmp:
        marker = Path(tmp) / "preempted"
        env = {**os.environ, PREEMPTED_FILE_ENV: str(marker)}
        # Its own session, so a signal sent to the wrapper's process group reaches the ranks once (through us),
        # not also through torch elastic's relay (which would count as the "second signal: stop at once").
        child = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *argv], env=env,
                                 start_new_session=True)
        pending: list[int] = []

        def on_signal(signum, frame):
            pending.append(signum)

        previous = {sig: signal.signal(sig, on_signal) for sig in forwarded}
        previous_int = signal.signal(signal.SIGINT, lambda s, f: child.send_signal(signal.SIGINT))
        try:
            while child.poll() is None:
                while pending:
                    signum = pending.pop(0)
                    ranks = training_processes(child.pid)
                    for pid in ranks or [child.pid]:  # no rank yet (still starting): the launcher stops
                        try:
                            os.kill(pid, signum)
                        except ProcessLookupError:
                            pass
                    print(f"rlhfkit.launch: {signal.Signals(signum).name} sent to "
                          f"{len(ranks) or 'the launcher, no'} training process(es)", file=sys.stderr, flush=True)
                time.sleep(0.1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.signal(signal.SIGINT, previous_int)
        if marker.exists() and marker.read_text().strip():
            return EXIT_PREEMPTED
        code = child.returncode
        return 128 - code if code < 0 else code


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0)
    sys.exit(launch(sys.argv[1:]))


if __name__ == "__main__":
    main()
