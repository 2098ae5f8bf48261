"""The API-server backend of generate.py: prompts spread over OpenAI-compatible vLLM servers (`generation/serve.py`).

    python generation/serve.py --model_name_or_path runs/sft --num_servers 2 &    # 127.0.0.1:8000, :8001
    python generation/generate.py --model_name_or_path runs/sft --api_base http://127.0.0.1:8000 \\
        http://127.0.0.1:8001 --dataset_path prompts.jsonl --num_samples 4 --output_dir runs/gen

Endpoint: `POST /v1/completions` with the prompt as **token ids** (`"prompt": [ids]`), `n=K`, the prompt's own `seed`
and `return_token_ids: true`. Not `/v1/chat/completions`: there the server renders the messages with its own chat
template (the tokenizer's, or `--chat-template`), which is not guaranteed to give our tokens (a `--chat_template`
given to generate.py, a template that adds BOS while the tokenizer adds another, a server started on another
tokenizer); with token ids the servers see exactly the prompt tokens the HF and offline vLLM backends see, and the
response ids come back so our tokenizer decodes them (same text rule as the other backends).

Every sampling field is sent explicitly (temperature, top_p, top_k=0, min_p=0, repetition_penalty, min_tokens,
presence/frequency penalty 0, our stop token ids): a server started without `--generation-config vllm` fills
unset fields from the checkpoint's generation_config.json, which would change the distribution.

Spreading and failures: one worker thread per server slot (`--api_concurrency` requests in flight per server)
takes prompts from one shared queue. A connection error, a timeout or a 5xx puts the prompt back on the queue (for
any server) and counts against that server; a server failing more than `--api_max_retries` times in a row is
dropped. A prompt is tried at most (`--api_max_retries` + 1) x the number of servers times in all, so every loop
ends. A 4xx (a request the server refuses, e.g. a prompt
longer than its max_model_len) stops the run with one line naming the URL. When no server is left, or a prompt has
used its tries, the run stops with one line naming the URL(s) and their last error; the rows answered so far are
written first, so a rerun continues after them. Results are deterministic per prompt (its seed), so a prompt retried
on another server gets the samples it would have got on the first.
"""

from __future__ import annotations

import http.client
import json
import logging
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rlhfkit.errors import UserError

logger = logging.getLogger(__name__)


class RetryableError(Exception):
    """The server did not answer usefully (connection refused or reset, timeout, 5xx): try again elsewhere."""


def normalize_base(url: str) -> str:
    """`http://host:port` or `http://host:port/v1` → `http://host:port` (no trailing slash)."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--api_base '{url}': expected a URL like http://127.0.0.1:8000")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _request(method: str, url: str, payload: dict | None, timeout: float) -> dict:
    """One HTTP request; the JSON answer, `RetryableError` for what another try may fix, `UserError` for a 4xx."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http URLs by design)
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace")
        if exc.code >= 500:
            raise RetryableError(f"HTTP {exc.code}: {' '.join(detail.split())}") from None
        raise UserError(f"{url}: HTTP {exc.code}: {' '.join(detail.split())}") from None
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError,
            OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RetryableError(f"{type(reason).__name__}: {reason}") from None
    if not body:
        return {}
    try:
        return json.loads(body)
    except ValueError:
        raise RetryableError(f"an answer that is not JSON ({body[:80]!r})") from None


def wait_until_healthy(bases: Sequence[str], wait_seconds: float, poll_seconds: float = 1.0) -> None:
    """Wait (at most `wait_seconds` in all) until every server answers `GET /health` with 200; one line naming the
    first server that never did."""
    deadline = time.monotonic() + wait_seconds
    for base in bases:
        last = None
        while True:
            try:
                _request("GET", f"{base}/health", None, timeout=max(1.0, min(10.0, wait_seconds)))
                break
            except (RetryableError, UserError) as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise UserError(f"vLLM server {base} never answered GET /health within {wait_seconds:g} s "
                                f"(last: {last}); is it started (generation/serve.py) and is the URL right?")
            time.sleep(poll_seconds)


def served_model(base: str, timeout: float) -> str:
    """The model id a server serves (`GET /v1/models`, the first one)."""
    try:
        answer = _request("GET", f"{base}/v1/models", None, timeout)
    except RetryableError as exc:
        raise UserError(f"vLLM server {base}: GET /v1/models failed ({exc})") from None
    models = answer.get("data") or []
    if not models or "id" not in models[0]:
        raise UserError(f"vLLM server {base}: GET /v1/models lists no model")
    return str(models[0]["id"])


@dataclass
class Server:
    base: str
    model: str
    failures_in_a_row: int = 0
    last_error: str | None = None
    answered: int = 0
    dropped: bool = False


@dataclass
class _Job:
    key: object
    payload: dict
    attempts: int = 0
    errors: list = field(default_factory=list)


class ApiGenerator:
    """Sends `/v1/completions` requests to a set of servers; `generate` mirrors `VLLMGenerator.generate`."""

    def __init__(self, bases: Sequence[str], tokenizer, *, timeout: float = 600.0, max_retries: int = 3,
                 concurrency: int = 8, wait_seconds: float = 60.0):
        if not bases:
            raise UserError("--api_base needs at least one URL")
        self.bases = [normalize_base(base) for base in bases]
        if len(set(self.bases)) != len(self.bases):
            raise UserError(f"--api_base lists a server twice: {' '.join(self.bases)}")
        self.tokenizer, self.timeout, self.max_retries, self.concurrency = tokenizer, timeout, max_retries, concurrency
        wait_until_healthy(self.bases, wait_seconds)
        self.servers = [Server(base, served_model(base, timeout)) for base in self.bases]
        names = {server.model for server in self.servers}
        if len(names) > 1:
            raise UserError(f"the --api_base servers serve different models: "
                            f"{', '.join(f'{s.base}: {s.model}' for s in self.servers)}")
        self._lock = threading.Lock()
        logger.info("API backend: %d server(s) serving %s: %s", len(self.servers), self.servers[0].model,
                    " ".join(self.bases))

    # ---------------------------------------------------------------------------------------------------------
    def payload(self, prompt_ids: Sequence[int], n: int, max_new_tokens: int, temperature: float, top_p: float,
                seed: int, stop_ids: Sequence[int], extra: dict) -> dict:
        return {
            "model": self.servers[0].model, "prompt": list(prompt_ids), "n": n, "max_tokens": max_new_tokens,
            "temperature": temperature, "top_p": top_p, "top_k": 0, "min_p": 0.0, "seed": int(seed),
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": extra.get("repetition_penalty", 1.0),
            "min_tokens": extra.get("min_tokens", 0), "stop_token_ids": list(stop_ids), "return_token_ids": True,
            "skip_special_tokens": True,
        }

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, max_new_tokens: int, temperature: float,
                 top_p: float, seeds: Sequence[int], stop_ids: Sequence[int], processors: dict | None = None,
                 on_result: Callable[[int, list[dict]], None] | None = None) -> list[list[dict]]:
        """`n` samples per prompt (`{"text", "token_ids", "finished"}`), in prompt order.

        on_result(index, samples) is called (from the calling thread) as each prompt is answered, so the caller can
        write what has been answered before an error stops the run."""
        from generation.vllm_backend import greedy_n, vllm_processor_params

        extra = vllm_processor_params(processors or {})
        asked = greedy_n(n, temperature)  # vLLM refuses n > 1 when greedy; the K samples are one answer repeated
        jobs = queue.Queue()
        for index, (ids, seed) in enumerate(zip(prompt_token_ids, seeds)):
            jobs.put(_Job(index, self.payload(ids, asked, max_new_tokens, temperature, top_p, seed, stop_ids, extra)))
        done: queue.Queue = queue.Queue()  # (index, samples) | (None, error message)
        stop = threading.Event()
        workers = [threading.Thread(target=self._worker, args=(server, jobs, done, stop, asked, stop_ids),
                                    daemon=True, name=f"api-{server.base}")
                   for server in self.servers if not server.dropped for _ in range(self.concurrency)]
        for worker in workers:
            worker.start()
        results: list[list[dict] | None] = [None] * len(prompt_token_ids)
        error = None
        try:
            answered = 0
            while answered < len(results):
                index, value = done.get()
                if index is None:
                    error = value
                    break
                value = value * (n // asked)
                results[index] = value
                answered += 1
                if on_result is not None:
                    on_result(index, value)
        finally:
            stop.set()
            for worker in workers:  # idle workers leave within 0.2 s; one still waiting on a dead server is a daemon
                worker.join(timeout=1.0)
        if error is not None:
            raise UserError(error)
        return results  # type: ignore[return-value]

    def _worker(self, server: Server, jobs: queue.Queue, done: queue.Queue, stop: threading.Event, n: int,
                stop_ids: Sequence[int]) -> None:
        url = f"{server.base}/v1/completions"
        while not stop.is_set():
            with self._lock:
                if server.dropped:
                    return
            try:
                job = jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            job.attempts += 1
            try:
                answer = _request("POST", url, job.payload, self.timeout)
                samples = self._samples(answer, job.payload, n, stop_ids, server.base)
            except RetryableError as exc:
                message = f"{server.base}: {exc}"
                job.errors.append(message)
                with self._lock:
                    server.failures_in_a_row += 1
                    server.last_error = str(exc)
                    if server.failures_in_a_row > self.max_retries and not server.dropped:
                        server.dropped = True
                        logger.warning("vLLM server %s dropped after %d failures in a row (last: %s)",
                                       server.base, server.failures_in_a_row, exc)
                    alive = [s for s in self.servers if not s.dropped]
                if not alive:
                    done.put((None, "no vLLM server left: " + "; ".join(
                        f"{s.base} failed {s.failures_in_a_row} times in a row (last: {s.last_error})"
                        for s in self.servers)))
                    return
                budget = (self.max_retries + 1) * len(self.servers)
                if job.attempts >= budget:
                    done.put((None, f"a prompt failed {job.attempts} times on the servers (last: {message})"))
                    return
                logger.warning("request to %s failed (%s); its prompt goes back to the queue (try %d of at most %d)",
                               server.base, exc, job.attempts, budget)
                time.sleep(min(2.0, 0.25 * job.attempts))
                jobs.put(job)
                continue
            except UserError as exc:
                done.put((None, str(exc)))
                return
            with self._lock:
                server.failures_in_a_row = 0
                server.answered += 1
            done.put((job.key, samples))

    def _samples(self, answer: dict, payload: dict, n: int, stop_ids: Sequence[int], base: str) -> list[dict]:
        from rlhfkit.sampling import truncate_at_stop

        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != n or any(c.get("token_ids") is None for c in choices):
            raise RetryableError(f"an answer with {len(choices)} choices (token ids: "
                                 f"{all(c.get('token_ids') is not None for c in choices)}) where n={n} were asked")
        prompt_ids = answer.get("prompt_token_ids") or choices[0].get("prompt_token_ids")
        if prompt_ids is not None and list(prompt_ids) != payload["prompt"]:
            raise UserError(f"{base}: the server changed the prompt tokens (sent {len(payload['prompt'])}, it used "
                            f"{len(prompt_ids)}); it must take token-id prompts as they are")
        samples = []
        for choice in choices:
            ids, finished = truncate_at_stop(list(choice["token_ids"]), stop_ids)
            samples.append({"text": self.tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids,
                            "finished": finished})
        return samples

    def stats(self) -> dict:
        return {server.base: {"answered": server.answered, "dropped": server.dropped} for server in self.servers}

    def close(self) -> None:
        return None
