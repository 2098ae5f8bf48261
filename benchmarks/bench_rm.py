"""Reward-model training throughput: rlhfkit's trainer (length-grouped batches) vs TRL's RewardTrainer, same process,
same model, same data, same steps. Prints real (non-pad) tokens/s for both and the ratio.

    python benchmarks/bench_rm.py                       # tiny random Llama, HH-RLHF pairs from ../shared if present
    python benchmarks/bench_rm.py --model smollm2-135m-instruct --steps 10 --batch_size 4 --max_length 512

Data: ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz (real, skewed lengths) when present, else synthetic pairs
with varied lengths. Both runs get the same pairs (those within max_length), so what differs is only the batching: TRL pads random batches; we sort into
length groups (`--train_sampling_strategy group_by_length`), which is what `rm_train.py` offers.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def load_rows(n: int, seed: int) -> tuple[list[dict], str]:
    from rlhfkit.data import load_preferences

    if HH.exists():
        data = load_preferences([str(HH)], seed=seed, skip_invalid=True)  # HH has some empty responses
        rows = data.rows
        source = str(HH.name)
    else:
        rng = random.Random(seed)
        words = "the sea is kind and the storm is cold but the keeper is warm and good".split()
        rows = []
        for i in range(n * 2):
            prompt = " ".join(rng.choices(words, k=rng.randint(5, 200)))
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(3, 60)))}],
                         "rejected": [{"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(3, 60)))}]})
        source = "synthetic (../shared absent)"
    random.Random(seed).shuffle(rows)
    return rows[:n], source


def run(trainer_factory, steps: int) -> tuple[float, int, int]:
    """(seconds, real tokens, padded tokens) for `steps` optimizer steps."""
    trainer = trainer_factory()
    counted = {"real": 0, "padded": 0}
    collator = trainer.data_collator

    def counting_collator(examples):
        batch = collator(examples)
        counted["real"] += int(batch["attention_mask"].sum())
        counted["padded"] += batch["attention_mask"].numel()
        return batch

    trainer.data_collator = counting_collator
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, counted["real"], counted["padded"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from rlhfkit.models import ensure_pad_token, load_reward_model, load_tokenizer, resolve_model
    from rlhfkit.reward_trainer import RewardModelTrainer
    from rlhfkit.tokenization import tokenize_pair

    path, _ = resolve_model(args.model)
    rows, source = load_rows(4 * args.steps * args.batch_size, args.seed)
    # the same pairs for both: only pairs that fit, so neither TRL's dropping nor our truncation changes the data
    probe = load_tokenizer(path)
    ensure_pad_token(probe)
    rows = [r for r in rows if not tokenize_pair(probe, r, args.max_length, "drop").dropped]
    rows = rows[: args.steps * args.batch_size]

    def config(tmp: str, strategy: str) -> RewardConfig:
        return RewardConfig(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                            report_to="none", save_strategy="no", logging_steps=10_000, bf16=False, use_cpu=True,
                            max_length=args.max_length, seed=args.seed, disable_tqdm=True,
                            train_sampling_strategy=strategy, dataset_num_proc=None)

    def fresh():
        tokenizer = load_tokenizer(path)
        model = load_reward_model(path, new_head=True)
        ensure_pad_token(tokenizer, model)
        return tokenizer, model

    def baseline():
        tokenizer, model = fresh()
        dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
        return RewardTrainer(model=model, args=config("/tmp/bench-rm-trl", "random"), train_dataset=dataset,
                             processing_class=tokenizer)

    def ours():
        tokenizer, model = fresh()
        records = []
        for row in rows:
            pair = tokenize_pair(tokenizer, row, args.max_length, "left_prompt")
            if not pair.dropped:
                records.append({"chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids,
                                "length": max(len(pair.chosen_ids), len(pair.rejected_ids))})
        return RewardModelTrainer(model=model, args=config("/tmp/bench-rm-ours", "group_by_length"),
                                  train_dataset=Dataset.from_list(records), processing_class=tokenizer)

    base_time, base_real, base_padded = run(baseline, args.steps)
    our_time, our_real, our_padded = run(ours, args.steps)
    base_tps, our_tps = base_real / base_time, our_real / our_time
    print(f"data: {source}; model: {args.model}; {args.steps} steps × {args.batch_size} pairs; max_length {args.max_length}")
    print(f"{'':<24}{'seconds':>10}{'real tok':>10}{'padding':>10}{'real tok/s':>12}")
    print(f"{'TRL RewardTrainer':<24}{base_time:>10.1f}{base_real:>10}{1 - base_real / base_padded:>10.1%}{base_tps:>12.1f}")
    print(f"{'rlhfkit (grouped)':<24}{our_time:>10.1f}{our_real:>10}{1 - our_real / our_padded:>10.1%}{our_tps:>12.1f}")
    print(f"ratio (rlhfkit / TRL) real tokens/s: {our_tps / base_tps:.2f}x")
    print("both runs train on the same pairs (all within max_length); only the batching differs")


if __name__ == "__main__":
    main()
