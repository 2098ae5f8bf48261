"""Rollout generation under DeepSpeed ZeRO-3: weights gathered once per rollout (what ppo_train.py does) against
ZeRO-3's default of gathering every layer's shards again at every forward, i.e. at every new token.

    accelerate launch --config_file configs/accelerate/zero3.yaml benchmarks/bench_ppo.py [--new_tokens 32]
    (runs on CPU-only machines too: DeepSpeed falls back to its CPU accelerator)

Same model, prompts, seeds and sampling in both variants (the samples are checked to be identical); prints seconds
per rollout and the ratio. The gap grows with the number of new tokens and the number of processes; on one process
there is nothing to gather and the ratio is ~1. Run without DeepSpeed it only reports the plain generation time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

PROMPTS = ["Tell me about the sea.", "Write a poem about the moon.", "Why is the sky blue?", "Describe a cat.",
           "What is a river?", "Give me a list of birds.", "Explain math.", "Say something kind."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from rlhfkit.distributed import new_accelerator
    from trl.models.utils import unwrap_model_for_generation

    from rlhfkit.rl.ppo import PolicyAndValue
    from rlhfkit.models import ensure_pad_token, load_causal_lm, load_tokenizer, resolve_model
    from rlhfkit.sampling import generate_batch, stop_token_ids

    torch.set_num_threads(1)
    accelerator = new_accelerator()
    path, _ = resolve_model(args.model)
    tokenizer = load_tokenizer(path, padding_side="left")
    policy = load_causal_lm(path)
    ensure_pad_token(tokenizer, policy)
    stops = stop_token_ids(tokenizer, policy)
    model = PolicyAndValue(policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    # asked of torch, not accelerate: under DeepSpeed on a CPU-only machine accelerate reports 1 process
    distributed = torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    main_process = not distributed or torch.distributed.get_rank() == 0
    if plugin is not None:  # no dataloader: fill DeepSpeed's "auto" batch sizes as ppo_train.py does
        plugin.deepspeed_config.update({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                                        "train_batch_size": world, "gradient_clipping": 1.0})
    model, optimizer = accelerator.prepare(model, optimizer)
    prompts = [[{"role": "user", "content": text}] for text in PROMPTS]

    def timed(gather: bool) -> tuple[float, list]:
        best, texts = float("inf"), None
        for _ in range(args.repeats):
            accelerator.wait_for_everyone()
            start = time.perf_counter()
            with unwrap_model_for_generation(model, accelerator, gather_deepspeed3_params=gather) as unwrapped:
                out = generate_batch(unwrapped.policy, tokenizer, prompts, n=1, max_new_tokens=args.new_tokens,
                                     temperature=1.0, top_p=1.0, seed=0, stop_ids=stops)
            accelerator.wait_for_everyone()
            best = min(best, time.perf_counter() - start)
            texts = [sample["text"] for row in out for sample in row]
        return best, texts

    once, texts_once = timed(gather=True)
    if plugin is None or plugin.zero_stage != 3:
        if main_process:
            print(f"no ZeRO-3: plain generation {once:.3f} s per rollout of {len(PROMPTS)}×{args.new_tokens} tokens")
        return
    per_forward, texts_per_forward = timed(gather=False)
    if main_process:
        same = "identical" if texts_once == texts_per_forward else "DIFFERENT"
        print(f"{world} processes, {len(PROMPTS)} prompts × {args.new_tokens} new tokens, "
              f"best of {args.repeats} (samples {same})")
        print(f"  gathered once per rollout : {once:8.3f} s")
        print(f"  gathered at every forward : {per_forward:8.3f} s")
        print(f"  ratio per-forward / once  : {per_forward / once:8.2f}×")


if __name__ == "__main__":
    main()
