"""The pairwise forward against its baseline on the same pairs and steps: RM training (TRL RewardTrainer), DPO
training (TRL DPOTrainer, both with precomputed reference log-probs) and annotation (K samples per prompt scored
together vs each response in its own padded row).

    python benchmarks/bench_pairwise.py                                   # all three, SmolLM2-135M, HH pairs
    python benchmarks/bench_pairwise.py --task rm --steps 2 --repeats 2 --batch_size 8 --max_length 1024
    python benchmarks/bench_pairwise.py --model tiny-random-llama --steps 4   # a quick smoke run
    python benchmarks/bench_pairwise.py --task rm --family qwen3          # a Qwen3 (or gemma3) at SmolLM2-135M's size

`--family qwen3|gemma3` builds that architecture from a config at SmolLM2-135M's size (30 layers, width 576, 9 heads,
3 KV heads, MLP 1536, SmolLM2's tokenizer and vocabulary; Gemma3 with its 5:1 sliding/global layers), random weights
(timing only), so `auto` is shown choosing the layout by checking a model that is not Llama-shaped. The "ours" rows
also report what that check cost (`rlhfkit.layout_check.check_layout`, run once before the first batch) against a
100-step run at the measured speed.

Every run is its own process (peak RSS is per process); baseline and ours alternate (B, O, B, O, …) so a machine
that slows down or speeds up mid-benchmark biases neither; the table shows the median of the repeats. Printed per
run: wall seconds of the training (or scoring) call, real tokens/s (tokens of the pairs as TRL counts them: prompt +
response per side, no padding), the padding share of what was computed, tokens actually computed, the model
FLOPs those computed tokens cost (linear layers 6·P per token for training / 2·P for scoring, attention on each
row's length, the LM head on the positions where it ran) as GFLOP/s against the dense fp32 matmul peak measured in
the same process, and peak RSS.

Data: ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz (real HH-RLHF harmless pairs) when present, else synthetic
pairs with skewed lengths. Only pairs within --max_length are used, so TRL's dropping and our truncation see the
same data.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
def load_rows(seed: int) -> tuple[list[dict], str]:
    from rlhfkit.data import load_preferences

    if HH.exists():
        rows = load_preferences([str(HH)], seed=seed, skip_invalid=True).rows  # HH has a few empty responses
        source = "HH-RLHF harmless-base test (../shared)"
    else:
        rng = random.Random(seed)
        words = "the sea is kind and the storm is cold but the keeper is warm and good".split()
        rows = []
        for _ in range(512):
            prompt = " ".join(rng.choices(words, k=int(rng.paretovariate(1.2) * 40)))
            rows.append({"prompt": [{"role": "user", "content": prompt[:4000]}],
                         "chosen": [{"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(3, 60)))}],
                         "rejected": [{"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(3, 60)))}]})
        source = "synthetic skewed pairs (../shared absent)"
    random.Random(seed).shuffle(rows)
    return rows, source


def fitting_rows(rows, tokenizer, max_length: int, count: int) -> list[dict]:
    from rlhfkit.tokenization import tokenize_pair

    kept = [r for r in rows if not tokenize_pair(tokenizer, r, max_length, "drop").dropped]
    if len(kept) < count:
        raise SystemExit(f"only {len(kept)} pairs fit max_length {max_length}; need {count}")
    return kept[:count]


# ---------------------------------------------------------------------------------------------------------------
# cost accounting
# ---------------------------------------------------------------------------------------------------------------
def matmul_peak_gflops(seconds: float = 2.0) -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * 2048 ** 3 * count / (time.perf_counter() - start) / 1e9


class Counter:
    """Wraps a collator and adds up what each batch makes the model compute."""

    def __init__(self, collator, model, training: bool, lm_head: bool):
        self.collator, self.training, self.lm_head = collator, training, lm_head
        config = model.config
        self.layers = config.num_hidden_layers
        self.width = config.hidden_size
        self.vocab = config.vocab_size
        embeddings = model.get_input_embeddings().weight.numel()
        self.body = sum(p.numel() for p in model.parameters()) - embeddings
        if lm_head and not getattr(config, "tie_word_embeddings", False):
            self.body -= self.vocab * self.width
        self.totals = {"real": 0, "computed": 0, "layout": 0, "flops": 0.0}

    def add(self, rows: int, width: int, computed: int, real: int, head_positions: int) -> None:
        factor = 6 if self.training else 2
        flops = factor * self.body * rows * width + factor * 2 * self.layers * self.width * rows * width ** 2
        if self.lm_head:
            flops += factor * self.vocab * self.width * head_positions
        self.totals["real"] += real
        self.totals["computed"] += computed
        self.totals["layout"] += rows * width
        self.totals["flops"] += flops

    def __call__(self, examples):
        batch = self.collator(examples)
        self.count(batch)
        return batch

    def count(self, batch) -> None:
        from rlhfkit.pairwise import Plan

        if "pw_chunks" in batch:
            for chunk in batch["pw_chunks"]:
                self.count(chunk)
            return
        if "pw_meta" in batch:
            plan = Plan.from_inputs(batch)
            rows, width = plan.input_ids.shape
            self.add(rows, width, plan.computed_tokens, plan.sequence_tokens, int(plan.logit_index.numel()))
        else:
            mask = batch["attention_mask"]
            rows, width = mask.shape
            # TRL's fused LM head scores every position off-GPU (it compacts to completion tokens only with Triton)
            self.add(rows, width, int(mask.sum()), int(mask.sum()), rows * width)


# ---------------------------------------------------------------------------------------------------------------
# workers (one per process)
# ---------------------------------------------------------------------------------------------------------------
SMOLLM2_135M_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)


def family_model(family: str, path: str, head: str):
    """A reward model ("reward") or causal LM ("causal") of `family` at SmolLM2-135M's size with random weights;
    "smollm2" loads the built-in checkpoint itself."""
    import transformers

    from rlhfkit.models import load_causal_lm, load_reward_model

    if family == "smollm2":
        return load_reward_model(path, new_head=True) if head == "reward" else load_causal_lm(path)
    vocab = transformers.AutoConfig.from_pretrained(path).vocab_size
    if family == "qwen3":
        config = transformers.Qwen3Config(**SMOLLM2_135M_SHAPE, head_dim=64, vocab_size=vocab)
    elif family == "gemma3":
        config = transformers.Gemma3TextConfig(**SMOLLM2_135M_SHAPE, head_dim=64, vocab_size=vocab,
                                               sliding_window=512, sliding_window_pattern=6)
    else:
        raise ValueError(f"unknown family {family!r}")
    config.num_labels = 1
    cls = transformers.AutoModelForSequenceClassification if head == "reward" else transformers.AutoModelForCausalLM
    return cls.from_config(config, attn_implementation="sdpa")


def timed_layout_check() -> dict:
    """Wrap rlhfkit.layout_check.check_layout so the worker can report what choosing the layout cost."""
    from rlhfkit import layout_check

    spent = {"check_seconds": 0.0, "checks": 0}
    check = layout_check.check_layout

    def timed(model, kind):
        start = time.perf_counter()
        try:
            return check(model, kind)
        finally:
            spent["check_seconds"] += time.perf_counter() - start
            spent["checks"] += 1

    layout_check.check_layout = timed
    return spent


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    check_cost = timed_layout_check()
    from rlhfkit.models import ensure_pad_token, load_tokenizer, resolve_model

    path, _ = resolve_model(args.model)
    rows, _ = load_rows(args.seed)
    peak = matmul_peak_gflops()
    tokenizer = load_tokenizer(path)
    if args.task == "annotate":
        return {"peak_gflops": peak, **annotate_worker(args, path, rows, tokenizer), **check_cost}
    ensure_pad_token(tokenizer)
    rows = fitting_rows(rows, tokenizer, args.max_length, args.steps * args.batch_size)
    torch.manual_seed(args.seed)
    if args.task == "rm":
        model = family_model(args.family, path, "reward")
        ensure_pad_token(tokenizer, model)
        trainer, counter = rm_trainer(args, model, tokenizer, rows)
        start, cpu_start = time.perf_counter(), time.process_time()
    else:
        model = family_model(args.family, path, "causal")
        ensure_pad_token(tokenizer, model)
        # DPO: the reference precomputation (in the constructor) is timed too
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer, counter = dpo_trainer(args, model, tokenizer, rows)
    trainer.train()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_gflops": peak, **counter.totals,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "pairwise_layout": getattr(trainer, "pairwise_layout", "padded"), **check_cost}


def _training_config(cls, args, **extra):
    return cls(output_dir=f"/tmp/bench-pairwise-{args.task}-{args.variant}", max_steps=args.steps,
               per_device_train_batch_size=args.batch_size, report_to="none", save_strategy="no",
               logging_steps=10_000, bf16=False, use_cpu=True, max_length=args.max_length, seed=args.seed,
               disable_tqdm=True, dataset_num_proc=None, **extra)


def rm_trainer(args, model, tokenizer, rows):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from rlhfkit.train.reward_trainer import RewardModelTrainer
    from rlhfkit.tokenization import tokenize_pair

    config = _training_config(RewardConfig, args)
    if args.variant == "baseline":
        dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    else:
        records = []
        for row in rows:
            pair = tokenize_pair(tokenizer, row, args.max_length, "left_prompt")
            records.append({"chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids})
        trainer = RewardModelTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                                     processing_class=tokenizer, pairwise_forward="auto")
    counter = Counter(trainer.data_collator, model, training=True, lm_head=False)
    trainer.data_collator = counter
    return trainer, counter


def dpo_trainer(args, model, tokenizer, rows):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from rlhfkit.layout_check import choose_layout
    from rlhfkit.train.dpo_trainer import PackedDPOTrainer, PackedPreferenceCollator

    config = _training_config(DPOConfig, args, precompute_ref_log_probs=True)
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    if args.variant == "baseline":
        cls, extra = DPOTrainer, {}
        collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length)
    else:
        cls, extra = PackedDPOTrainer, {"pairwise_forward": "auto"}
        collator = PackedPreferenceCollator(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length,
                                            kind=choose_layout(model, "auto"))
    # the constructor runs the reference precompute (forward only) through the same collator
    counter = Counter(collator, model, training=False, lm_head=True)
    trainer = cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                  data_collator=counter, **extra)
    counter.training = True
    return trainer, counter


def annotate_worker(args, path, rows, tokenizer) -> dict:
    """K responses per prompt (HH: chosen, rejected and two other rows' final replies), scored by a reward model
    with a fresh head: ours groups them by prompt, the baseline gives each response its own padded row."""
    import torch

    from rlhfkit.models import ensure_pad_token
    from rlhfkit.layout_check import choose_layout
    from rlhfkit.scoring import batched_plans, encode_conversations, prompt_groups, score_sequences

    torch.manual_seed(args.seed)
    model = family_model(args.family, path, "reward").eval()
    ensure_pad_token(tokenizer, model)
    conversations = []
    for i in range(args.prompts):
        row = rows[i]
        others = [rows[(i + j) % len(rows)]["chosen"] for j in (1, 2)][: args.k - 2]
        for response in [row["chosen"], row["rejected"], *others][: args.k]:
            conversations.append(row["prompt"] + response)
    sequences = encode_conversations(tokenizer, conversations, args.max_length)
    groups = prompt_groups(conversations)
    # the baseline is the per-response path as it was: every response its own row, batches sorted by length
    layout = "padded" if args.variant == "baseline" else "auto"
    groups = None if args.variant == "baseline" else groups
    kind = choose_layout(model, layout)
    counter = Counter(lambda batch: batch, model, training=False, lm_head=False)
    for _, plan in batched_plans(sequences, groups, args.batch_size, kind, tokenizer.pad_token_id):
        counter.count(plan.to_inputs())
    start, cpu_start = time.perf_counter(), time.process_time()
    score_sequences(model, sequences, tokenizer.pad_token_id, args.batch_size, groups, layout)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start, **counter.totals,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "pairwise_layout": kind}


# ---------------------------------------------------------------------------------------------------------------
# the orchestrator
# ---------------------------------------------------------------------------------------------------------------
BASELINE_NAME = {"rm": "TRL RewardTrainer", "dpo": "TRL DPOTrainer", "annotate": "each response alone (padded)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="all", choices=["all", "rm", "dpo", "annotate"])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--family", default="smollm2", choices=["smollm2", "qwen3", "gemma3"],
                        help="smollm2: the --model checkpoint; qwen3/gemma3: that architecture built from a config at "
                             "SmolLM2-135M's size, random weights, --model's tokenizer")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per step (annotation: sequences per forward)")
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=16, help="annotation: prompts (K responses each)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=["baseline", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--json_out", help="also write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    if args.variant:  # a worker process
        print("RESULT " + json.dumps(worker(args)))
        return

    from rlhfkit.builtin_models import materialize

    if not Path(args.model).exists():
        materialize(args.model)  # convert once, outside the timed processes
    _, source = load_rows(args.seed)
    tasks = ["rm", "dpo", "annotate"] if args.task == "all" else [args.task]
    report = {"model": args.model, "family": args.family, "data": source, "runs": {}}
    print(f"model {args.model} (family {args.family}); data: {source}; {args.threads} threads; {args.repeats} repeats, "
          "alternated")
    for task in tasks:
        runs = {"baseline": [], "ours": []}
        for _ in range(args.repeats):
            for variant in ("baseline", "ours"):
                runs[variant].append(run_worker(args, task, variant))
        report["runs"][task] = runs
        print_table(task, args, runs)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))


def run_worker(args, task: str, variant: str) -> dict:
    argv = [sys.executable, __file__, "--task", task, "--variant", variant, "--model", args.model,
            "--family", args.family,
            "--steps", str(args.steps), "--batch_size", str(args.batch_size), "--max_length", str(args.max_length),
            "--prompts", str(args.prompts), "--k", str(args.k), "--threads", str(args.threads),
            "--seed", str(args.seed)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"{task}/{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def print_table(task: str, args, runs: dict) -> None:
    what = {"rm": f"RM training, {args.steps} steps x {args.batch_size} pairs",
            "dpo": f"DPO training (precomputed reference, timed with it), {args.steps} steps x {args.batch_size} pairs",
            "annotate": f"annotation, {args.prompts} prompts x K={args.k}, {args.batch_size} sequences per forward"}[task]
    print(f"\n{what}, max_length {args.max_length}")
    print(f"{'':<32}{'seconds':>9}{'real tok/s':>11}{'padding':>9}{'computed':>10}{'GFLOP/s':>9}{'of peak':>8}"
          f"{'RSS MB':>8}")
    medians = {}
    for variant, name in (("baseline", BASELINE_NAME[task]), ("ours", "rlhfkit pairwise")):
        results = runs[variant]
        seconds = statistics.median(r["seconds"] for r in results)
        best = min(results, key=lambda r: abs(r["seconds"] - seconds))
        gflops = best["flops"] / best["seconds"] / 1e9
        medians[variant] = seconds
        print(f"{name:<32}{seconds:>9.1f}{best['real'] / best['seconds']:>11.1f}"
              f"{1 - best['computed'] / max(best['layout'], 1):>9.1%}{best['computed']:>10}{gflops:>9.1f}"
              f"{gflops / best['peak_gflops']:>8.0%}{max(r['rss_mb'] for r in results):>8.0f}")
    times = ", ".join(f"{r['seconds']:.1f}" for r in runs["baseline"]) + " | " + \
        ", ".join(f"{r['seconds']:.1f}" for r in runs["ours"])
    cpu = {v: statistics.median(r["cpu_seconds"] for r in runs[v]) for v in runs}
    print(f"speed-up (baseline / ours, median seconds): {medians['baseline'] / medians['ours']:.2f}x  "
          f"(runs: {times}; matmul peak {runs['ours'][0]['peak_gflops']:.0f} GFLOP/s)")
    # CPU seconds of the process: less sensitive than wall time to other jobs on the machine (with one thread
    # per process there is no spin-waiting to inflate them)
    print(f"CPU-time ratio (baseline / ours, median CPU seconds {cpu['baseline']:.1f} / {cpu['ours']:.1f}): "
          f"{cpu['baseline'] / cpu['ours']:.2f}x")
    ours = runs["ours"]
    check = statistics.median(r["check_seconds"] for r in ours)
    line = (f"layout under auto: {ours[0]['pairwise_layout']}; its check: {check:.2f} s median "
            f"({ours[0]['checks']} layout(s) checked, once per process)")
    if task in ("rm", "dpo"):
        per_step = medians["ours"] / args.steps
        line += f" = {100 * check / (100 * per_step):.2f}% of a 100-step run at {per_step:.1f} s/step"
    print(line)


if __name__ == "__main__":
    main()
