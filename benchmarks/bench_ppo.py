"""Rollout generation under DeepSpeed ZeRO-3: weights gathered once per rollout (what ppo_train.py does) against
ZeRO-3's default of gathering every layer's shards again at every forward, i.e. at every new token.

    accelerate launch --config_file configs/accelerate/zero3.yaml benchmarks/bench_ppo.py [--new_tokens 32]
    (runs on CPU-only machines too: DeepSpeed falls back to its CPU accelerator)

Same model, prompts, seeds and sampling in both variants (the samples are checked to be identical); prints seconds
per rollout and the ratio. The gap grows with the number of new tokens and the number of processes; on one process
there is nothing to gather and the ratio is ~1. Run without DeepSpeed it only reports the plain generation time.

    python benchmarks/bench_ppo.py --vllm_rollouts [--model smollm2-135m-instruct --estimators grpo rloo --steps 4]

`--vllm_rollouts`: the step time of ppo_train.py with rollouts on a colocated vLLM engine (`--use_vllm true`: samples,
then the weight push and its check after the update) against our own HF decoding loop, same prompts, seeds, flags
and threads; each run its own process, the two backends alternated; medians over the steps after the first (the
first pays warm-ups). The engine's start time is printed apart (once per run, not per step).

    python benchmarks/bench_ppo.py --vllm_sync_gaps --dtype float32|bfloat16 [--model smollm2-135m-instruct]

`--vllm_sync_gaps`: what the `--use_vllm` sync check's tolerance (`rlhfkit.rl.vllm_rollout.SYNC_TOLERANCE`) is set
from: the probe gap between the engine and the policy after a correct push, the sampler/trainer gap on sampled
tokens, and the gap a stale engine shows after one AdamW step of the policy (full weights, lr 1e-6 and 1e-5).

    python benchmarks/bench_ppo.py --vs_trl [--model smollm2-135m-instruct --steps 6 --repeats 2]

`--vs_trl`: our GRPO step (ppo_train.py) against TRL's `GRPOTrainer` on the same settings: policy, LoRA r16/α32 on
all linear layers, generated `add` problems (rlhfkit.rl.tasks) with the exact_answer reward (the same Python rule on
both sides, TRL receiving the answer column as a keyword), K samples of P prompts a step, the same max new tokens,
temperature 1, no top-k/top-p, one update per rollout, β = 0.02 (k3 as a loss term), DAPO loss with clip-higher
(0.2/0.28), learning rate, seed, threads, fp32. Each run is its own process; ours and TRL's alternate; step times
are medians over the steps after the first (TRL: wall time of each trainer step, generation included; ours:
generation + scoring + training). Prints both step times, the ratio, and both reward curves (mean exact_answer).
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


def length_reward(prompts, responses):
    """The vLLM-vs-HF rollout benchmark's reward (`--reward_fn this_file.py:length_reward`): no reward model, so
    the step time is rollout + update + sync; the number of words, capped, which gives GRPO/RLOO a signal."""
    return [min(len(text.split()), 30) / 30 for text in responses]


def _median(values: list[float]) -> float:
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def vllm_rollouts(args) -> None:
    """GRPO/RLOO step time with vLLM rollouts against our HF rollouts (module docstring)."""
    import json
    import os
    import subprocess
    import tempfile

    flags = ["--model_name_or_path", args.model, "--dataset_path", str(REPO / "data/prompts/train.jsonl"),
             "--reward_fn", f"{Path(__file__).resolve()}:length_reward", "--use_peft", "true", "--lora_r", "16",
             "--lora_alpha", "32", "--num_samples_per_prompt", str(args.samples_per_prompt), "--rollout_batch_size",
             str(args.prompts_per_step), "--per_device_train_batch_size", "8", "--max_new_tokens",
             str(args.new_tokens), "--max_steps", str(args.steps), "--ppo_epochs", "1", "--learning_rate", "1e-4",
             "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_ppo_vllm_") as tmp:
        for repeat in range(args.repeats):
            for estimator in args.estimators:
                for backend in (("hf", "vllm") if repeat % 2 == 0 else ("vllm", "hf")):
                    out = Path(tmp) / f"{estimator}-{backend}-{repeat}"
                    command = [sys.executable, str(REPO / "ppo_train.py"), *flags, "--advantage_estimator", estimator,
                               "--use_vllm", str(backend == "vllm").lower(), "--output_dir", str(out)]
                    begin = time.perf_counter()
                    done = subprocess.run(command, env=env, capture_output=True, text=True)
                    seconds = time.perf_counter() - begin
                    if done.returncode != 0:
                        sys.exit(f"error: {estimator}/{backend} failed:\n{done.stderr[-3000:]}")
                    rows = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
                    info = json.loads((out / "run_info.json").read_text())
                    results.setdefault((estimator, backend), []).append(
                        {"rows": rows[1:] or rows, "process_s": seconds,
                         "start_s": info.get("rollouts", {}).get("start_seconds", 0.0)})
                    print(f"  {estimator:5s} {backend:4s} run {repeat + 1}: {seconds:6.1f} s", flush=True)

    def step_seconds(row: dict) -> float:
        return sum(row.get(key, 0.0) for key in ("time/generation_s", "time/scoring_s", "time/training_s",
                                                  "time/vllm_push_s", "time/vllm_check_s"))

    print(f"\n{args.model}, {args.prompts_per_step} prompts x {args.samples_per_prompt} samples x {args.new_tokens} "
          f"new tokens a step, LoRA r16, {args.threads} threads; medians over steps 2..{args.steps} of "
          f"{args.repeats} run(s)")
    print(f"{'estimator':9s} {'rollouts':8s} {'step s':>7s} {'generate':>9s} {'update':>7s} {'sync':>6s} "
          f"{'engine start':>12s} {'process s':>9s}")
    for estimator in args.estimators:
        medians = {}
        for backend in ("hf", "vllm"):
            runs = results[(estimator, backend)]
            rows = [row for run in runs for row in run["rows"]]
            medians[backend] = _median([step_seconds(row) for row in rows])
            sync = _median([row.get("time/vllm_push_s", 0.0) + row.get("time/vllm_check_s", 0.0) for row in rows])
            print(f"{estimator:9s} {backend:8s} {medians[backend]:7.2f} "
                  f"{_median([row['time/generation_s'] for row in rows]):9.2f} "
                  f"{_median([row['time/training_s'] for row in rows]):7.2f} {sync:6.2f} "
                  f"{_median([run['start_s'] for run in runs]):12.1f} {_median([run['process_s'] for run in runs]):9.1f}")
        print(f"{estimator:9s} step speed-up (hf / vllm): {medians['hf'] / medians['vllm']:.2f}x")


def vllm_sync_gaps(args) -> None:
    """The sync check's gaps, measured (module docstring)."""
    import contextlib
    import types

    import torch
    from transformers import AutoModelForCausalLM

    from rlhfkit.models import ensure_pad_token, load_tokenizer, resolve_model
    from rlhfkit.rl.vllm_rollout import VLLMRollout, policy_token_logprobs
    from rlhfkit.sampling import render_generation_prompt, stop_token_ids

    path, _ = resolve_model(args.model)
    tokenizer = load_tokenizer(path, padding_side="left")

    def load():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ensure_pad_token(tokenizer, model)
        return model

    policy = load()
    bf16 = args.dtype == "bfloat16"
    config = types.SimpleNamespace(bf16=bf16, fp16=False, vllm_sync_tolerance=None, seed=0, vllm_kv_cache_gib=1.0,
                                   vllm_gpu_memory_utilization=0.3, temperature=1.0, max_new_tokens=args.new_tokens)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(), autocast=autocast)
    engine = VLLMRollout(policy, tokenizer, config, stop_token_ids(tokenizer, policy), [], accelerator,
                         max_model_len=512)
    synced = engine.sync(policy, 0)["vllm/sync_probe_gap"]
    prompts = [render_generation_prompt(tokenizer, [{"role": "user", "content": text}]) for text in PROMPTS[:4]]
    samples = engine.generate(prompts, [1, 2, 3, 4], 2)
    sampler_gap, tokens = 0.0, 0
    for row, sample in enumerate(samples):
        prompt = prompts[row // 2]
        with autocast():
            mine = policy_token_logprobs(policy, prompt + sample["token_ids"])[len(prompt) - 1:]
        sampler_gap = max(sampler_gap, (mine - torch.tensor(sample["logprobs"])).abs().max().item())
        tokens += len(sample["token_ids"])
    print(f"{args.model}, engine {engine.dtype}, probe {len(engine.probe)} tokens, tolerance {engine.tolerance:g}")
    print(f"  probe gap after a correct push        : {synced:.3g}")
    print(f"  sampler/trainer gap ({tokens} sampled tokens): {sampler_gap:.3g}")
    for lr in (1e-6, 1e-5):  # a stale engine: the policy takes one step, the engine keeps the old weights
        stepped = load()
        optimizer = torch.optim.AdamW(stepped.parameters(), lr=lr)
        batch = torch.tensor([prompts[0] + samples[0]["token_ids"]])
        with autocast():
            logits = stepped(input_ids=batch).logits.float()
        loss = -logits.log_softmax(-1)[0, :-1].gather(-1, batch[0, 1:, None]).mean()
        loss.backward()
        optimizer.step()
        print(f"  probe gap of an engine one step stale (lr {lr:g}): {engine.probe_gap(stepped):.3g}")
    engine.close()


def add_problem_reward(prompts, completions, answer, **kwargs):
    """TRL's side of `--vs_trl`: exact_answer (rlhfkit.rl.rewards) on conversational completions, answer column."""
    from rlhfkit.rl.rewards import answers_match, extract_final_answer

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(answers_match(extract_final_answer(text), ref)) for text, ref in zip(texts, answer)]


def trl_worker(args) -> None:
    """One TRL GRPOTrainer run (a subprocess of `--vs_trl`): writes step times and log history to args.trl_worker."""
    import json

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhfkit.args import ModelArguments
    from rlhfkit.models import peft_config, resolve_model

    torch.set_num_threads(args.threads)
    path, _ = resolve_model(args.model)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": row["prompt"], "answer": row["answer"]} for row in rows])
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    steps_s: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.begin = time.perf_counter()

        def on_step_end(self, *_, **__):
            steps_s.append(time.perf_counter() - self.begin)

    config = GRPOConfig(
        output_dir=str(Path(args.trl_worker).parent / "trl_out"),
        per_device_train_batch_size=args.prompts_per_step * args.samples_per_prompt,
        num_generations=args.samples_per_prompt, max_completion_length=args.new_tokens, max_steps=args.steps,
        learning_rate=1e-4, lr_scheduler_type="constant", beta=0.02, loss_type="dapo", epsilon=0.2,
        epsilon_high=0.28, temperature=1.0, top_p=1.0, top_k=0, num_iterations=1, gradient_accumulation_steps=1,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True)
    lora = peft_config(ModelArguments(model_name_or_path=args.model, use_peft=True, lora_r=16, lora_alpha=32),
                       "CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[add_problem_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora, callbacks=[StepTimer()])
    trainer.train()
    history = [row for row in trainer.state.log_history if "reward" in row]
    Path(args.trl_worker).write_text(json.dumps({"steps_s": steps_s, "history": history}))


def vs_trl(args) -> None:
    """Our GRPO step against TRL's GRPOTrainer (module docstring)."""
    import json
    import os
    import subprocess
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, list[dict]] = {"rlhfkit": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="bench_ppo_trl_") as tmp:
        data = Path(tmp) / "add.jsonl"
        subprocess.run([sys.executable, "-m", "rlhfkit.rl.tasks", "--kind", "add", "--n", "200", "--seed", "1",
                        "--output", str(data)], check=True, env=env, cwd=REPO, capture_output=True)
        ours_flags = [
            "--model_name_or_path", args.model, "--dataset_path", str(data), "--reward_fn", "exact_answer",
            "--use_peft", "true", "--lora_r", "16", "--lora_alpha", "32", "--advantage_estimator", "grpo",
            "--num_samples_per_prompt", str(args.samples_per_prompt), "--rollout_batch_size",
            str(args.prompts_per_step), "--per_device_train_batch_size",
            str(args.prompts_per_step * args.samples_per_prompt), "--max_new_tokens", str(args.new_tokens),
            "--max_steps", str(args.steps), "--ppo_epochs", "1", "--learning_rate", "1e-4",
            "--lr_scheduler_type", "constant", "--kl_coef", "0", "--kl_loss_coef", "0.02",
            "--loss_aggregation", "token", "--cliprange_low", "0.2", "--cliprange_high", "0.28",
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0"]
        for repeat in range(args.repeats):
            for who in (("rlhfkit", "trl") if repeat % 2 == 0 else ("trl", "rlhfkit")):
                out = Path(tmp) / f"{who}-{repeat}"
                if who == "rlhfkit":
                    command = [sys.executable, str(REPO / "ppo_train.py"), *ours_flags, "--output_dir", str(out)]
                else:
                    out.mkdir()
                    command = [sys.executable, str(Path(__file__).resolve()), "--trl_worker", str(out / "trl.json"),
                               "--data", str(data), "--model", args.model, "--steps", str(args.steps),
                               "--prompts_per_step", str(args.prompts_per_step), "--samples_per_prompt",
                               str(args.samples_per_prompt), "--new_tokens", str(args.new_tokens),
                               "--threads", str(args.threads)]
                begin = time.perf_counter()
                done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
                seconds = time.perf_counter() - begin
                if done.returncode != 0:
                    sys.exit(f"error: {who} run {repeat + 1} failed:\n{done.stderr[-3000:]}")
                if who == "rlhfkit":
                    rows = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
                    steps = [row["time/generation_s"] + row["time/scoring_s"] + row["time/training_s"] for row in rows]
                    rewards = [row["reward/exact_answer"] for row in rows]
                else:
                    record = json.loads((out / "trl.json").read_text())
                    steps, rewards = record["steps_s"], [row["reward"] for row in record["history"]]
                results[who].append({"steps": steps, "rewards": rewards, "process_s": seconds})
                print(f"  {who:8s} run {repeat + 1}: {seconds:6.1f} s, median step "
                      f"{_median(steps[1:] or steps):.2f} s", flush=True)
    print(f"\n{args.model}, GRPO, {args.prompts_per_step} prompts x {args.samples_per_prompt} samples x "
          f"{args.new_tokens} new tokens a step, LoRA r16, {args.threads} threads, {args.steps} steps x "
          f"{args.repeats} run(s); medians over steps 2..{args.steps}")
    medians = {}
    for who in ("trl", "rlhfkit"):
        steps = [s for run in results[who] for s in (run["steps"][1:] or run["steps"])]
        medians[who] = _median(steps)
        curve = " ".join(f"{value:.2f}" for value in results[who][0]["rewards"])
        print(f"{who:8s} step {medians[who]:7.2f} s   process {_median([r['process_s'] for r in results[who]]):7.1f} s"
              f"   reward curve (run 1): {curve}")
    print(f"speed-up (TRL step / our step, medians): {medians['trl'] / medians['rlhfkit']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm_rollouts", action="store_true",
                        help="time PPO steps with vLLM rollouts against our HF rollouts (module docstring)")
    parser.add_argument("--estimators", nargs="+", default=["grpo", "rloo"], help="--vllm_rollouts: estimators")
    parser.add_argument("--steps", type=int, default=4, help="--vllm_rollouts: PPO steps per run")
    parser.add_argument("--prompts_per_step", type=int, default=4, help="--vllm_rollouts: prompts per step")
    parser.add_argument("--samples_per_prompt", type=int, default=4, help="--vllm_rollouts: K")
    parser.add_argument("--threads", type=int, default=2, help="--vllm_rollouts: OMP threads per run")
    parser.add_argument("--vllm_sync_gaps", action="store_true",
                        help="measure the gaps the --use_vllm sync check's tolerance is set from (module docstring)")
    parser.add_argument("--dtype", default="float32", help="--vllm_sync_gaps: float32 | bfloat16")
    parser.add_argument("--vs_trl", action="store_true",
                        help="time our GRPO step against TRL's GRPOTrainer on the same settings (module docstring)")
    parser.add_argument("--trl_worker", default=None, help=argparse.SUPPRESS)  # internal: one TRL run
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(args)
        return
    if args.vs_trl:
        if args.model == "tiny-random-llama":  # the default of the other modes; a random model has no reward signal
            args.model = "smollm2-135m-instruct"
        vs_trl(args)
        return
    if args.vllm_sync_gaps:
        vllm_sync_gaps(args)
        return
    if args.vllm_rollouts:
        vllm_rollouts(args)
        return

    import torch
    from rlhfkit.distributed import new_accelerator
    from trl.models.utils import unwrap_model_for_generation

    from rlhfkit.rl.networks import PolicyAndValue
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
