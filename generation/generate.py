"""Sample K responses per prompt from a policy and write them as JSONL (the first step of iterative DPO / RS).

    python generation/generate.py --model_name_or_path OUT/sft --dataset_path prompts.jsonl \\
        --output_dir OUT/gen --num_samples 4 --temperature 1.0 --max_new_tokens 256 --seed 42

Output: `OUT/gen/generations.jsonl`, one row per prompt in prompt-set order:
    {"id", "prompt": [messages], "responses": [K strings],
     "meta": {"model", "backend", "num_samples", "temperature", "top_p", "max_new_tokens", "seed", "prompt_seed",
              "finished": [K bools], "response_tokens": [K ints]}}
plus metrics.json (prompts, samples, tokens/s), args.yaml and run_info.json (the stage contract).

Features:
- Backends (`--backend auto`): vLLM whenever it imports and supports the model, on a GPU or a CPU
  (`generation/vllm_backend.py`: an engine in this process, one request per prompt with n=K; the CPU settings are
  `rlhfkit.vllm_engine`'s); else our batched HF decoding loop (`rlhfkit.sampling.decode`: left padding, KV cache,
  each prompt prefilled once for its K samples, a row dropped from the batch at its stop token: EOS or the chat
  template's end-of-turn token). With `--api_base URL [URL ...]`: running OpenAI-compatible vLLM servers
  (`generation/serve.py` starts them), the prompts spread over them (`generation/api_client.py`: token-id prompts
  on /v1/completions, bounded retries on connection errors and 5xx, a dead server's prompts retried on the others).
  Every backend gets the same prompt token ids (our chat-template rendering) and writes the same row schema; the
  vLLM and API backends give the same samples for the same seeds, and greedy text equal to the HF backend's up to
  float rounding.
- The checkpoint's generation_config.json: its logits processors (repetition_penalty, no_repeat_ngram_size,
  min_new_tokens, suppress_tokens, bad_words_ids, ...) apply, as `model.generate` would apply them, and are
  recorded in run_info.json; `--checkpoint_processors false` samples softmax(logits / temperature) only, which is
  what ppo_train.py's rollouts always do. Sampling knobs (temperature, top_p) come from the flags, never from it.
- Threads: `--num_threads` (default: torch's, i.e. OMP_NUM_THREADS or every core); a stage that runs alone
  should use every core. With `$RLHFKIT_THREADS_FILE` set, the count written in that file is applied between
  batches (`rlhfkit.threads`), so a stage that outlives its partner takes the freed core.
- Prompts: message lists, prompt strings, instruction/question fields or the prompts of a preference set, from
  local files or a hub name (`rlhfkit.prompts.load_prompts`).
- Sharding: `--local_index i --world_size n` (one process per GPU, e.g. a shell loop) writes shard i into
  `OUT.partial/`; `generation/merge_data.py` merges and checks the shards. Under `accelerate launch` with several
  processes each process is a shard and the main process merges.
- Resumable: rows are appended per batch (whole lines, fsynced); a rerun keeps the complete rows, cuts a torn last
  line and generates only the prompts not yet written.

Assumptions:
- Reproducibility: prompt p's samples are drawn with seed `derive_seed(--seed, id of p)` (sample j: `derive_seed(
  that, j)`), never from a shared RNG, so they do not depend on the batch, the batch size, the shard or an
  interruption: a sharded-then-merged run equals the unsharded run. Rows are generated longest prompt first (less
  padding), which for the same reason does not change any sample.
- A rerun must use the same model and sampling settings as the rows already written (checked; otherwise pass
  --overwrite_output_dir true).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as `python generation/generate.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import logging
import time
import types
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from generation import shards, vllm_backend
from rlhfkit.checkpoints import StageOutput, fingerprint, parent_record
from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.errors import UserError

logger = logging.getLogger("generate")

# meta keys that must match for rows of an earlier, interrupted run to be kept
_RUN_KEYS = ("model", "backend", "num_samples", "temperature", "top_p", "max_new_tokens", "seed",
             "checkpoint_processors")


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "Policy: a stage output dir, HF dir or built-in name."})
    dataset_path: list[str] = field(
        default=None, metadata={"help": "Prompt set(s): .jsonl/.json/.parquet files, dirs or hub names (see rlhfkit.prompts)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset or save_to_disk dir."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    skip_invalid_rows: bool = field(default=False, metadata={"help": "Skip (and count) malformed prompt rows instead of failing."})
    output_dir: str = field(default=None, metadata={"help": "Output dir; generations.jsonl is written there."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start over: discard rows of an earlier run."})
    num_samples: int = field(default=4, metadata={"help": "K: responses per prompt."})
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum tokens per response."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 is greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]."})
    checkpoint_processors: bool = field(
        default=True,
        metadata={"help": "Apply the logits processors of the checkpoint's generation_config.json (repetition "
                  "penalty, n-gram ban, min_new_tokens, suppressed/bad words), as model.generate does; false samples "
                  "softmax(logits / temperature) only, like PPO's rollouts."},
    )
    seed: int = field(default=42, metadata={"help": "Base seed; each prompt's seed is derived from it and the prompt id."})
    backend: str = field(
        default="auto",
        metadata={"help": "auto (vLLM if it imports and supports the model, on GPU or CPU; else hf; api with "
                  "--api_base) | hf | vllm | api."},
    )
    api_base: list[str] | None = field(
        default=None,
        metadata={"help": "URLs of running vLLM servers (e.g. http://127.0.0.1:8000 http://127.0.0.1:8001; "
                  "generation/serve.py starts them): the prompts are spread over them."},
    )
    api_timeout: float = field(default=600.0, metadata={"help": "API: seconds to wait for one request's answer."})
    api_max_retries: int = field(
        default=3, metadata={"help": "API: a server failing more than this many times in a row is dropped; a prompt "
                             "is tried at most (this + 1) x servers times."})
    api_concurrency: int = field(default=8, metadata={"help": "API: requests in flight per server."})
    api_wait_seconds: float = field(
        default=60.0, metadata={"help": "API: how long to wait at start for every server's GET /health."})
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Prompts per generate call (default: 8 for hf, 256 for vllm and api); rows are saved per batch."},
    )
    local_index: int = field(default=0, metadata={"help": "This process's shard index (with --world_size)."})
    world_size: int = field(default=1, metadata={"help": "Number of shards run as separate processes; merge with merge_data.py."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs per model replica."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM: fraction of GPU memory to use."})
    kv_cache_gib: float | None = field(
        default=None, metadata={"help": "vLLM: KV cache in GiB (CPU default: $VLLM_CPU_KVCACHE_SPACE, else 1; GPU "
                                "default: from --gpu_memory_utilization)."})
    max_model_len: int | None = field(
        default=None, metadata={"help": "vLLM: prompt + response tokens per sequence (default: the model's)."})
    dtype: str = field(
        default="auto",
        metadata={"help": "float32 | bfloat16 | float16 | auto (the checkpoint's). On a CPU with AMX, bfloat16 "
                  "generates several times faster than float32 (benchmarks/bench_generate.py)."},
    )
    num_threads: int | None = field(
        default=None, metadata={"help": "torch threads for the HF backend (default: OMP_NUM_THREADS, else every core)."}
    )
    chat_template: str | None = field(default=None, metadata={"help": "Chat template (string or .jinja file) if the tokenizer has none."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the checkpoint."})

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("--model_name_or_path is required")
        if not self.dataset_path:
            raise ValueError("--dataset_path is required (a prompt file, dir or hub name)")
        if not self.output_dir:
            raise ValueError("--output_dir is required")
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("--num_samples and --max_new_tokens must be ≥ 1")
        if self.temperature < 0:
            raise ValueError("--temperature must be ≥ 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("--top_p must be in (0, 1]")
        if self.backend not in ("auto", "hf", "vllm", "api"):
            raise ValueError(f"--backend must be auto, hf, vllm or api, not '{self.backend}'")
        if self.api_base and self.backend not in ("auto", "api"):
            raise ValueError(f"--api_base sends the prompts to servers: it cannot go with --backend {self.backend}")
        if self.backend == "api" and not self.api_base:
            raise ValueError("--backend api needs --api_base URL [URL ...]")
        if self.api_max_retries < 0 or self.api_concurrency < 1 or self.api_timeout <= 0:
            raise ValueError("--api_max_retries must be ≥ 0, --api_concurrency ≥ 1 and --api_timeout > 0")
        if self.world_size < 1 or not 0 <= self.local_index < self.world_size:
            raise ValueError(f"--local_index must be in [0, --world_size) (got {self.local_index} of {self.world_size})")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("--batch_size must be ≥ 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("--num_threads must be ≥ 1")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"--dtype must be float32, bfloat16, float16 or auto, not '{self.dtype}'")


def run_meta(args: ScriptArguments, backend: str) -> dict:
    return {
        "model": args.model_name_or_path,
        "backend": backend,
        "num_samples": args.num_samples,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "checkpoint_processors": args.checkpoint_processors,
    }


def _check_resumed_rows(rows: list[dict], meta: dict, assigned_ids: set[str], path) -> None:
    for number, row in enumerate(rows, start=1):
        old = row.get("meta", {})
        for key in _RUN_KEYS:
            if old.get(key) != meta[key]:
                raise UserError(
                    f"{path}: row {number}: field 'meta.{key}': written with {old.get(key)!r}, this run uses "
                    f"{meta[key]!r}; rerun with the same settings or pass --overwrite_output_dir true"
                )
        if row.get("id") not in assigned_ids:
            raise UserError(
                f"{path}: row {number}: field 'id': prompt '{row.get('id')}' is not in this shard's prompt set "
                f"(the prompts changed since the interrupted run); pass --overwrite_output_dir true"
            )


ARGUMENTS = (ScriptArguments,)  # what main takes (CLI, YAML, tests)


def main(args: ScriptArguments) -> dict | None:
    """Generate this process's shard; merge and finalize the output dir when every shard is done here."""
    # ---------------------------------------------------------------- setup
    from rlhfkit.distributed import partial_state

    from rlhfkit.models import load_causal_lm, load_tokenizer, resolve_model, torch_dtype
    from rlhfkit.prompts import load_prompts
    from rlhfkit.logits_processors import checkpoint_processor_settings
    from rlhfkit.sampling import derive_seed, generate_batch, render_generation_prompt, stop_token_ids
    from rlhfkit.threads import follow as follow_thread_hint

    state = partial_state()
    setup_logging(state.is_main_process)
    if state.num_processes > 1 and args.world_size > 1:
        raise UserError("use either --world_size/--local_index or accelerate processes for sharding, not both")
    shard_index, world_size = (
        (state.process_index, state.num_processes) if state.num_processes > 1 else (args.local_index, args.world_size)
    )
    model_path, model_record = resolve_model(args.model_name_or_path)
    backend = "api" if args.api_base else args.backend
    if backend == "auto":
        backend, why = vllm_backend.auto_backend(model_path, args.trust_remote_code)
        logger.info("--backend auto: %s (%s)", backend, why)
    if backend == "vllm" and state.num_processes > 1:
        # vLLM starts its own workers per engine; under accelerate every process would claim all visible GPUs
        raise UserError("the vLLM backend shards with --local_index/--world_size (one process per GPU set, "
                        "CUDA_VISIBLE_DEVICES per shard), not with accelerate processes")
    batch_size = args.batch_size or (8 if backend == "hf" else 256)
    meta = run_meta(args, backend)
    output = StageOutput(args.output_dir, "generate", overwrite=args.overwrite_output_dir, resume=True)

    # ---------------------------------------------------------------- model & tokenizer
    tokenizer = load_tokenizer(model_path, args.chat_template, padding_side="left", trust_remote_code=args.trust_remote_code)
    generation_config = _generation_config(model_path) if backend != "hf" else None
    # EOS, the template's end of turn and generation_config.json's eos_token_id (the HF path reads the latter from
    # the loaded model below)
    stop_ids = stop_token_ids(tokenizer, types.SimpleNamespace(generation_config=generation_config))

    # ---------------------------------------------------------------- data
    prompts = load_prompts(args.dataset_path, split=args.dataset_split, max_prompts=args.max_prompts,
                           skip_invalid=args.skip_invalid_rows)
    indices = shards.assigned_indices(len(prompts), shard_index, world_size)
    shard = shards.ShardFile(output.staging, shard_index, world_size)
    done_before = shard.open_for_append(discard=args.overwrite_output_dir)
    assigned_ids = {prompts[i]["id"] for i in indices}
    _check_resumed_rows(done_before, meta, assigned_ids, shard.path)
    output.check_identity(str(shard.path) if done_before else None, (args,), prompts, model_path, tokenizer,
                          record=f"shard-{shard_index}-of-{world_size}")  # rows kept are from this same run
    written = {row["id"] for row in done_before}
    pending = [i for i in indices if prompts[i]["id"] not in written]
    logger.info("shard %d/%d: %d prompts, %d already written, %d to generate (backend %s, K=%d)",
                shard_index, world_size, len(indices), len(indices) - len(pending), len(pending), backend,
                args.num_samples)
    prompt_ids = {i: render_generation_prompt(tokenizer, prompts[i]["prompt"]) for i in pending}
    pending.sort(key=lambda i: -len(prompt_ids[i]))  # longest first: less padding, out-of-memory shows at once

    # ---------------------------------------------------------------- generate
    generator, model = None, None  # loaded only when there is work: rerunning a finished shard just merges
    processors, engine_record = {}, {}
    if pending:
        if args.num_threads is not None:
            import torch

            torch.set_num_threads(args.num_threads)
        if backend == "vllm":
            import torch

            threads = args.num_threads or torch.get_num_threads()
            generator = vllm_backend.VLLMGenerator(
                model_path, tokenizer, args.tensor_parallel_size, args.dtype, args.gpu_memory_utilization,
                max_model_len=args.max_model_len, seed=args.seed, trust_remote_code=args.trust_remote_code,
                kv_cache_gib=args.kv_cache_gib, cpu_threads=threads,
                cpu_offset=shard_index * threads if world_size > 1 else None,  # CPU shards: each its own cores
            )
            engine_record = generator.settings
        elif backend == "api":
            from generation.api_client import ApiGenerator

            generator = ApiGenerator(args.api_base, tokenizer, timeout=args.api_timeout,
                                     max_retries=args.api_max_retries, concurrency=args.api_concurrency,
                                     wait_seconds=args.api_wait_seconds)
            engine_record = {"api_base": " ".join(generator.bases), "served_model": generator.servers[0].model}
        if generator is not None:
            if args.checkpoint_processors:
                processors = checkpoint_processor_settings(generation_config)
        else:
            model = load_causal_lm(model_path, dtype=torch_dtype(args.dtype), trust_remote_code=args.trust_remote_code)
            model.to(state.device).eval()
            stop_ids = stop_token_ids(tokenizer, model)
            if args.checkpoint_processors:
                processors = checkpoint_processor_settings(model)
        if processors:
            logger.info("applying the checkpoint's generation_config.json processors: %s "
                        "(--checkpoint_processors false samples the raw distribution)",
                        ", ".join(f"{key}={value}" for key, value in processors.items()))
    new_tokens, started = 0, time.perf_counter()
    try:
        bar = tqdm(total=len(pending), desc=f"generate (shard {shard_index})", unit="prompt", disable=not pending)
        for start in range(0, len(pending), batch_size):
            if generator is None:
                follow_thread_hint()  # take the cores a finished partner stage left (RLHFKIT_THREADS_FILE)
            batch = pending[start : start + batch_size]
            seeds = [derive_seed(args.seed, prompts[i]["id"]) for i in batch]

            def row(position: int, outs: list[dict], batch=batch, seeds=seeds) -> dict:
                i = batch[position]
                return {
                    "id": prompts[i]["id"],
                    "prompt": prompts[i]["prompt"],
                    "responses": [o["text"] for o in outs],
                    "meta": {**meta, "prompt_seed": seeds[position], "finished": [o["finished"] for o in outs],
                             "response_tokens": [len(o["token_ids"]) for o in outs]},
                }

            if backend == "api":
                answered: dict[int, list[dict]] = {}
                try:
                    samples = generator.generate([prompt_ids[i] for i in batch], args.num_samples,
                                                 args.max_new_tokens, args.temperature, args.top_p, seeds, stop_ids,
                                                 processors, on_result=answered.__setitem__)
                except UserError:  # no server left: keep what was answered, so a rerun continues after it
                    shard.append([row(position, answered[position]) for position in sorted(answered)])
                    raise
            elif generator is not None:
                samples = generator.generate([prompt_ids[i] for i in batch], args.num_samples, args.max_new_tokens,
                                             args.temperature, args.top_p, seeds, stop_ids, processors)
            else:
                samples = generate_batch(model, tokenizer, [prompts[i]["prompt"] for i in batch], args.num_samples,
                                         args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                         prompt_seeds=seeds, stop_ids=stop_ids,
                                         checkpoint_processors=args.checkpoint_processors)
            rows = [row(position, outs) for position, outs in enumerate(samples)]
            new_tokens += sum(len(o["token_ids"]) for outs in samples for o in outs)
            shard.append(rows)
            bar.update(len(batch))
            elapsed = time.perf_counter() - started
            bar.set_postfix(tok_s=f"{new_tokens / elapsed:.1f}" if elapsed > 0 else "-")
        bar.close()
    finally:
        shard.close()
        if generator is not None:
            generator.close()
    seconds = time.perf_counter() - started
    if pending:
        logger.info("shard %d: %d new tokens in %.1f s = %.1f tokens/s", shard_index, new_tokens, seconds,
                    new_tokens / seconds if seconds > 0 else float("nan"))
    shard.mark_done({
        "index": shard_index,
        "world_size": world_size,
        "assigned": [[i, prompts[i]["id"]] for i in indices],
        "prompt_fingerprint": fingerprint([row["id"] for row in prompts]),
        "generated_tokens": new_tokens,
        "seconds": seconds,
        "processors": {key: value if isinstance(value, (int, float, str, list, bool)) else str(value)
                       for key, value in processors.items()},
        "engine": {key: value if isinstance(value, (int, float, str, list, bool)) or value is None else str(value)
                   for key, value in engine_record.items()},
        "meta": meta,
        "args": to_dict(args),
        "parent": parent_record(
            {"path": model_path, "stage": model_record.get("parent_stage")} if "parent_stage" in model_record else None,
            args.model_name_or_path, model_record,
        ),
        "prompt_report": prompts.report,
    })

    # ---------------------------------------------------------------- save
    state.wait_for_everyone()
    if world_size > 1 and state.num_processes == 1:
        logger.info("shard %d of %d done; merge with: python generation/merge_data.py --output_dir %s --world_size %d",
                    shard_index, world_size, args.output_dir, world_size)
        return None
    if not state.is_main_process:
        state.wait_for_everyone()  # pairs with the barrier at the end of StageOutput.finalize on the main process
        return None
    return finalize(output, world_size, [row["id"] for row in prompts])


def finalize(output: StageOutput, world_size: int, expected_ids: list[str] | None) -> dict:
    """Merge the shards in `output.staging` into generations.jsonl and complete the stage (shared with merge_data)."""
    from rlhfkit.files import write_jsonl_atomic

    output.lock_shared("merge")  # one merger at a time (merge_data.py or the main process here)
    rows, done = shards.merge_shards(output.staging, world_size, expected_ids)
    if len({d["prompt_fingerprint"] for d in done}) != 1:
        raise UserError(f"{output.staging}: the shards were run on different prompt sets")
    for record in done[1:]:
        if record["meta"] != done[0]["meta"]:
            differing = sorted(k for k in record["meta"] if record["meta"][k] != done[0]["meta"].get(k))
            raise UserError(f"{output.staging}: shard {record['index']} was generated with other settings than shard 0 "
                            f"({', '.join(differing)})")
    write_jsonl_atomic(output.staging / shards.OUTPUT_FILE, rows)
    shards.remove_shards(output.staging, world_size)
    samples = sum(len(row["responses"]) for row in rows)
    finished = sum(sum(row["meta"]["finished"]) for row in rows)
    tokens = sum(sum(row["meta"]["response_tokens"]) for row in rows)
    metrics = {
        "prompts": len(rows),
        "samples": samples,
        "finished_fraction": round(finished / samples, 4) if samples else None,
        "mean_response_tokens": round(tokens / samples, 2) if samples else None,
        "response_tokens": tokens,
        **shards.throughput(done),
    }
    first = done[0]
    run_info = {
        **first["parent"],
        "dataset": {"paths": first["args"]["dataset_path"], "fingerprint": first["prompt_fingerprint"],
                    "report": first["prompt_report"]},
        "sampling": first["meta"],
        "generation_config_processors": first.get("processors", {}),
        "vllm_engine": first.get("engine", {}),
        "outputs": {"generations": shards.OUTPUT_FILE},
    }
    final = output.finalize(run_info, metrics, first["args"])
    logger.info("wrote %s: %d prompts × %d samples; %s tokens/s", final / shards.OUTPUT_FILE, len(rows),
                first["meta"]["num_samples"], metrics["tokens_per_second"])
    return metrics


def _generation_config(model_path: str):
    """The checkpoint's generation_config.json (None when it has none)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
