"""CPU generation: plain `model.generate` against ours (`rlhfkit.sampling.generate_batch`, and the whole HF path
of `generation/generate.py`) and vLLM (offline engine in the process, and generate.py's vLLM backend) on the same
prompts, K samples each.

    python benchmarks/bench_generate.py                       # SmolLM2-135M-Instruct, 16 prompts × 4, 48 tokens
    python benchmarks/bench_generate.py --threads 1 --repeats 5 --variants baseline sampling
    python benchmarks/bench_generate.py --dtype bfloat16      # AMX / AVX512-BF16 CPUs
    python benchmarks/bench_generate.py --ours_dtype bfloat16 # baseline in float32, ours (and the stage) in bfloat16
    python benchmarks/bench_generate.py --dtype bfloat16 --n_prompts 32 --variants baseline sampling vllm

baseline and sampling run in one fresh subprocess per repeat, alternating batch by batch (which one goes first
alternates too), so a neighbour's load on a shared machine hits both alike; their ratio is the paired one (total
new tokens / total seconds of each, per repeat; the median over repeats is printed). The stage runs in its own
subprocess per repeat, between the paired ones; so do vllm and vllm_stage (an in-process vLLM engine binds the
process's threads and replaces torch.set_num_threads, so it never shares a process with the others), the order of
all these jobs alternating between repeats; their ratio to the baseline is a ratio of medians. Model loading and
engine start are never timed (the engine start is printed). Peak RSS is per variant: the
process's high-water mark is reset (/proc/self/clear_refs) before each variant's batch and read after it. Tokens
counted are real new tokens: up to and including each row's first stop token (EOS or end of turn), never the
padding a batch keeps generating after a row has ended.

- baseline: `model.generate(do_sample=True, top_k=0)`: the prompts of a batch repeated K times (what
  `num_return_sequences` does), stops at the same stop ids, batches of --batch_size prompts.
- sampling: `rlhfkit.sampling.generate_batch`, same batches (per-row seeds, prefill once per prompt, finished rows
  leave the batch).
- stage: `generation/generate.py`'s main (HF backend), with its own batching (--batch_size prompts, longest first),
  writing its JSONL: its tokens/s is measured inside the stage, as its metrics.json reports it.
- vllm: `generation.vllm_backend.VLLMGenerator.generate` (a `rlhfkit.vllm_engine.make_engine` engine with this
  machine's settings: on a CPU in-process, eager, no chunked prefill, 1 GiB KV cache, threads bound to the cores),
  same batches, prompts as our chat-template token ids, one request per prompt with n=K and its own seed,
  softmax(logits / 1) with no top-k/top-p as the others; dtype as ours (--ours_dtype, else --dtype).
- vllm_stage: `generation/generate.py`'s main with `--backend vllm` (--vllm_batch_size prompts per call).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
VARIANTS = ("baseline", "sampling", "stage", "vllm", "vllm_stage")


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:  # Linux: "5" resets the VmHWM high-water mark
            handle.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    """One measurement in this process: {variant: {"tokens", "seconds", "peak_rss_mb"}}."""
    import torch

    torch.set_num_threads(args.threads)
    from rlhfkit.models import load_causal_lm, load_tokenizer, resolve_model, torch_dtype
    from rlhfkit.prompts import load_prompts
    from rlhfkit.sampling import build_message_batch, generate_batch, stop_token_ids, truncate_at_stop

    path, _ = resolve_model(args.model)
    prompts = load_prompts([args.prompts], max_prompts=args.n_prompts)
    if args.variant in ("stage", "vllm_stage"):
        from generation import generate

        vllm = args.variant == "vllm_stage"
        _reset_peak_rss()
        with tempfile.TemporaryDirectory() as parent:
            out = str(Path(parent) / "gen")
            metrics = generate.main(generate.ScriptArguments(
                model_name_or_path=path, dataset_path=[args.prompts], max_prompts=args.n_prompts, output_dir=out,
                num_samples=args.k, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, seed=0,
                backend="vllm" if vllm else "hf", batch_size=args.vllm_batch_size if vllm else args.batch_size,
                dtype=args.ours_dtype or args.dtype, num_threads=args.threads, checkpoint_processors=False,
            ))
        return {args.variant: {"tokens": metrics["generated_tokens"], "seconds": metrics["generation_seconds"],
                               "peak_rss_mb": _peak_rss_mb()}}
    if args.variant == "vllm":
        return {"vllm": vllm_worker(args, path, prompts, stop_token_ids, truncate_at_stop)}

    tokenizer = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path, dtype=torch_dtype(args.dtype)).eval()
    ours = model
    if args.ours_dtype and args.ours_dtype != args.dtype:
        ours = load_causal_lm(path, dtype=torch_dtype(args.ours_dtype)).eval()
    stops = stop_token_ids(tokenizer, model)
    messages = [row["prompt"] for row in prompts]
    names = [name for name in ("baseline", "sampling") if name in args.variant.split(",")]
    totals = {name: {"tokens": 0, "seconds": 0.0, "peak_rss_mb": 0.0} for name in names}
    for number, start in enumerate(range(0, len(messages), args.batch_size)):
        chunk = messages[start : start + args.batch_size]
        for name in names if number % 2 == 0 else names[::-1]:
            _reset_peak_rss()
            began = time.perf_counter()
            if name == "baseline":
                batch = build_message_batch(tokenizer, [m for m in chunk for _ in range(args.k)])
                with torch.no_grad():
                    sequences = model.generate(**batch, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                               max_new_tokens=args.max_new_tokens, eos_token_id=stops,
                                               pad_token_id=tokenizer.pad_token_id)
                new = sequences[:, batch["input_ids"].shape[1]:].tolist()
                tokens = sum(len(truncate_at_stop(row, stops)[0]) for row in new)
            else:
                out = generate_batch(ours, tokenizer, chunk, args.k, args.max_new_tokens, 1.0, 1.0, seed=start,
                                     stop_ids=stops)
                tokens = sum(len(sample["token_ids"]) for group in out for sample in group)
            totals[name]["seconds"] += time.perf_counter() - began
            totals[name]["tokens"] += tokens
            totals[name]["peak_rss_mb"] = max(totals[name]["peak_rss_mb"], _peak_rss_mb())
    return totals


def vllm_worker(args, path: str, prompts, stop_token_ids, truncate_at_stop) -> dict:
    """The vllm variant: an engine with this machine's settings, the same batches as the paired variants."""
    from generation.vllm_backend import VLLMGenerator, greedy_n
    from rlhfkit.models import load_tokenizer
    from rlhfkit.sampling import derive_seed, render_generation_prompt

    tokenizer = load_tokenizer(path, padding_side="left")
    began = time.perf_counter()
    generator = VLLMGenerator(path, tokenizer, dtype=args.ours_dtype or args.dtype, seed=0, cpu_threads=args.threads)
    print(f"vLLM engine started in {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
    assert greedy_n(args.k, 1.0) == args.k
    stops = stop_token_ids(tokenizer)
    ids = [render_generation_prompt(tokenizer, row["prompt"]) for row in prompts]
    total = {"tokens": 0, "seconds": 0.0, "peak_rss_mb": 0.0}
    try:
        for start in range(0, len(ids), args.batch_size):
            chunk = ids[start : start + args.batch_size]
            seeds = [derive_seed(start, i) for i in range(len(chunk))]
            _reset_peak_rss()
            began = time.perf_counter()
            out = generator.generate(chunk, args.k, args.max_new_tokens, 1.0, 1.0, seeds, stops)
            total["seconds"] += time.perf_counter() - began
            total["tokens"] += sum(len(truncate_at_stop(s["token_ids"], stops)[0]) for group in out for s in group)
            total["peak_rss_mb"] = max(total["peak_rss_mb"], _peak_rss_mb())
    finally:
        generator.close()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", default=str(REPO / "data" / "prompts" / "train.jsonl"))
    parser.add_argument("--n_prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--vllm_batch_size", type=int, default=256,
                        help="prompts per call in vllm_stage (generate.py's vLLM default); vllm uses --batch_size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"))
    parser.add_argument("--ours_dtype", default=None, choices=("float32", "bfloat16", "auto"),
                        help="dtype of ours and the stage (default: --dtype); the baseline keeps --dtype")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set in the worker subprocess
    args = parser.parse_args()

    if args.variant:
        import logging

        logging.disable(logging.WARNING)
        print("RESULT " + json.dumps(worker(args)))
        return

    forwarded = _drop_variant_values(sys.argv[1:])
    results: dict[str, list[dict]] = {name: [] for name in args.variants}
    paired = ",".join(name for name in ("baseline", "sampling") if name in args.variants)
    jobs = [paired] if paired else []
    jobs += [name for name in ("stage", "vllm", "vllm_stage") if name in args.variants]
    for repeat in range(args.repeats):
        for job in jobs if repeat % 2 == 0 else jobs[::-1]:
            run = subprocess.run([sys.executable, __file__, *forwarded, "--variant", job], capture_output=True,
                                 text=True, env={**_env(), "OMP_NUM_THREADS": str(args.threads)})
            started = [line for line in run.stderr.splitlines() if line.startswith("vLLM engine started")]
            if started:
                print(f"repeat {repeat + 1} {job}: {started[-1]}", flush=True)
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode != 0 or not lines:
                sys.exit(f"{job} failed:\n{run.stderr[-3000:]}")
            for name, result in json.loads(lines[-1][len("RESULT "):]).items():
                results[name].append(result)
                print(f"repeat {repeat + 1} {name:9s} {result['tokens']:6d} new tokens in {result['seconds']:7.2f} s "
                      f"= {result['tokens'] / result['seconds']:7.1f} tokens/s, peak RSS {result['peak_rss_mb']:.0f} MB",
                      flush=True)

    def rate(row):
        return row["tokens"] / row["seconds"]

    print(f"\n{args.model}, {args.n_prompts} prompts × {args.k} samples, ≤ {args.max_new_tokens} new tokens, batches "
          f"of {args.batch_size} prompts, {args.threads} thread(s), baseline {args.dtype}, ours "
          f"{args.ours_dtype or args.dtype}, median of {args.repeats}")
    print(f"{'variant':10s} {'new tok/s':>10s} {'ratio':>7s} {'peak RSS MB':>12s}")
    for name, rows in results.items():
        if "baseline" in results and name == "sampling":  # paired: same process, same moments
            ratio = f"{statistics.median(rate(r) / rate(b) for r, b in zip(rows, results['baseline'])):6.2f}x"
        elif "baseline" in results:  # separate processes: ratio of medians
            ratio = f"{statistics.median(map(rate, rows)) / statistics.median(map(rate, results['baseline'])):6.2f}x"
        else:
            ratio = "      -"
        print(f"{name:10s} {statistics.median(map(rate, rows)):10.1f} {ratio} "
              f"{max(r['peak_rss_mb'] for r in rows):12.0f}")


def _drop_variant_values(argv: list[str]) -> list[str]:
    """argv without `--variants a b c` (the worker gets `--variant` instead)."""
    out, skipping = [], False
    for item in argv:
        if item == "--variants":
            skipping = True
            continue
        if skipping and not item.startswith("--"):
            continue
        skipping = False
        out.append(item)
    return out


def _env() -> dict:
    import os

    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error"}


if __name__ == "__main__":
    main()
