"""dpo_train.py against a plain TRL `DPOTrainer` script on the same pairs: wall time, training time, peak memory.

    python benchmarks/bench_dpo.py [--model tiny-random-llama] [--pairs 256] [--max_steps 32] [--precompute]

Each variant runs in its own process (peak RSS is per process) with the same model, data, seed, batch size and
steps; the table prints ours / TRL ratios. What ours adds on top of TRL: data validation and conversion, the
long-pair count, the stage contract (atomic output dir, run_info.json) and, with --precompute and an explicit
reference, releasing the reference model. A ratio near 1.0 for training time is the expected result.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
POSITIVE = ["good", "great", "happy", "kind", "wonderful", "nice", "joy", "love", "bright", "warm"]
NEGATIVE = ["bad", "terrible", "sad", "cruel", "awful", "mean", "hate", "dark", "cold", "rude"]
TOPICS = ["the sea", "the moon", "a river", "the city", "a friend", "a teacher", "a dog", "a tree", "a bird", "a ship"]


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        rows.append({
            "prompt": [{"role": "user", "content": f"Tell me about {topic}."}],
            "chosen": [{"role": "assistant", "content": f"{topic} is " + " ".join(rng.sample(POSITIVE, 4)) + "."}],
            "rejected": [{"role": "assistant", "content": f"{topic} is " + " ".join(rng.sample(NEGATIVE, 4)) + "."}],
        })
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_trl(opts, data_path: str, out_dir: str) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from rlhfkit.models import resolve_model

    path, _ = resolve_model(opts.model)
    rows = [json.loads(line) for line in open(data_path, encoding="utf-8")]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    config = DPOConfig(output_dir=out_dir, max_steps=opts.max_steps, per_device_train_batch_size=opts.batch_size,
                       learning_rate=5e-6, max_length=opts.max_length, precompute_ref_log_probs=opts.precompute,
                       gradient_checkpointing=False, bf16=False, save_strategy="no", report_to="none",
                       logging_steps=10, seed=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(out_dir)
    return {"train_runtime": result.metrics["train_runtime"]}


def run_ours(opts, data_path: str, out_dir: str) -> dict:
    import dpo_train
    from rlhfkit.cli import parse_args

    argv = ["--model_name_or_path", opts.model, "--dataset_path", data_path, "--output_dir", out_dir,
            "--max_steps", str(opts.max_steps), "--per_device_train_batch_size", str(opts.batch_size),
            "--learning_rate", "5e-6", "--max_length", str(opts.max_length),
            "--precompute_ref_log_probs", str(opts.precompute).lower(), "--gradient_checkpointing", "false",
            "--save_strategy", "no", "--logging_steps", "10", "--seed", "0", "--disable_tqdm", "true"]
    metrics = dpo_train.main(*parse_args((dpo_train.ScriptArguments, dpo_train.ModelArguments,
                                          dpo_train.DPOArguments), argv))
    return {"train_runtime": metrics["train_runtime"]}


def child(opts) -> None:
    import torch

    torch.set_num_threads(opts.threads)
    start = time.perf_counter()
    result = (run_trl if opts.variant == "trl" else run_ours)(opts, opts.data, opts.out)
    result.update(wall=time.perf_counter() - start, peak_rss_mb=peak_rss_mb())
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--max_steps", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--precompute", action="store_true", help="--precompute_ref_log_probs in both variants")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", choices=["trl", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.variant:
        child(opts)
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pairs.jsonl")
        with open(data, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in make_pairs(opts.pairs))
        results = {}
        for variant in ("trl", "ours"):
            cmd = [sys.executable, __file__, "--variant", variant, "--data", data, "--out", os.path.join(tmp, variant),
                   "--model", opts.model, "--max_steps", str(opts.max_steps), "--batch_size", str(opts.batch_size),
                   "--max_length", str(opts.max_length), "--threads", str(opts.threads)]
            cmd += ["--precompute"] if opts.precompute else []
            env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), TOKENIZERS_PARALLELISM="false")
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"{variant} failed:\n{proc.stderr[-2000:]}")
            results[variant] = json.loads(lines[-1][len("RESULT "):])

    print(f"model={opts.model} pairs={opts.pairs} steps={opts.max_steps} batch={opts.batch_size} "
          f"precompute={opts.precompute}")
    print(f"{'metric':<16}{'TRL':>12}{'ours':>12}{'ours/TRL':>10}")
    for key in ("train_runtime", "wall", "peak_rss_mb"):
        trl_value, ours_value = results["trl"][key], results["ours"][key]
        print(f"{key:<16}{trl_value:>12.2f}{ours_value:>12.2f}{ours_value / trl_value:>10.2f}")


if __name__ == "__main__":
    main()
