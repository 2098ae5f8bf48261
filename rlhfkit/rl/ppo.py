"""One PPO step's math wired to the models: advantages and the KL term, the clipped update over minibatches, the
step's metrics, and checkpoint bookkeeping. ppo_train.py is the thin stage script and the loop; the rest of the
machinery has one module per topic:

- `rlhfkit.rl.config`: `PPOConfig`, the stage's flags;
- `rlhfkit.rl.networks`: the policy+value module, the reference, the value model, LoRA, token suppression;
- `rlhfkit.rl.rollout`: sampling a step's responses and the forward passes over them; which prompts a step takes;
- `rlhfkit.rl.scoring`: the reward sources applied to a rollout, shaped for the objective; held-out evaluation;
- `rlhfkit.rl.estimators` / `rlhfkit.rl.objectives`: the math, as pure functions.

On-policy by construction: rollouts sample softmax(logits / temperature) with our own decoding loop
(`rlhfkit.sampling.decode`), ignoring the checkpoint's `generation_config.json` processors (logged when there are
any); `--suppress_tokens` is the one processor RL can ask for, and it is applied both in the sampler and in
`PolicyAndValue.forward` / `reference_logprobs`. Updates run dropout-free (`dropout_free`), so at the first
minibatch of the first epoch the ratio is exactly 1 (logged as `policy/first_ratio`, `policy/first_approx_kl`).

Written by hand because no maintained library provides PPO with a critic any more (TRL removed `PPOTrainer`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from rlhfkit.checkpoints import StageOutput
from rlhfkit.files import write_json_atomic
from rlhfkit.saving import merge_lora_state_dict
from rlhfkit.faults import seal_checkpoint
from rlhfkit.rl import estimators as rl
from rlhfkit.rl import objectives
from rlhfkit.rl.config import PPOConfig
from rlhfkit.rl.networks import dropout_free
from rlhfkit.rl.rollout import Rollout, policy_forward


VALUE_MODEL_DIR = "value_model"
TRAINER_STATE = "trainer_state.json"


def step_advantages(args: PPOConfig, scores, kl, mask, values, kl_coef: float, step_rewards=None):
    """Advantages [B, T] and value targets [B, T] (None without a critic) for the configured estimator."""
    return rl.compute_advantages(
        args.advantage_estimator, scores, kl, mask, values, kl_coef, gamma=args.gamma, lam=args.lam,
        group_size=args.num_samples_per_prompt, whiten_rewards=args.whiten_rewards,
        whiten_advantages=args.whiten_advantages, grpo_scale_by_std=args.grpo_scale_by_std,
        step_rewards=step_rewards,
    )


def kl_controller(args: PPOConfig):
    """The KL coefficient β: adaptive (Ziegler et al.) with --kl_target, else fixed."""
    if args.kl_target is not None:
        return rl.AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
    return rl.FixedKLController(args.kl_coef)


def token_kl(args: PPOConfig, logprobs, ref_logprobs, mask):
    """Per-token KL to the reference with --kl_estimator, 0 outside the response ([B, T])."""
    return rl.kl_per_token(logprobs, ref_logprobs, args.kl_estimator) * mask


@torch.no_grad()
def rollout_metrics(batch: Rollout, raw, scores, logprobs, ref_logprobs, kl, kl_coef, values, returns) -> dict:
    """Per-process means of what the rollout looked like (gathered and averaged by the caller)."""
    mask = batch.mask
    penalty = rl.masked_sum(kl, mask, dim=1)
    metrics = {
        "reward/raw": raw.mean(),
        "reward/raw_std": raw.std() if raw.numel() > 1 else torch.zeros((), device=raw.device),
        "reward/normalized": scores.mean(),
        "reward/with_kl": (scores - kl_coef * penalty).mean(),
        "kl/penalty": penalty.mean(),  # the estimator the reward uses, summed over the response
        "kl/k1": rl.masked_sum(logprobs - ref_logprobs, mask, dim=1).mean(),
        "kl/k3": rl.masked_sum(rl.kl_per_token(logprobs, ref_logprobs, "k3"), mask, dim=1).mean(),
        "response/length": mask.sum(dim=1).mean(),
        "response/eos_fraction": batch.has_stop.float().mean(),
        # how far the sampler's distribution is from the one PPO optimises (0 up to float rounding: on-policy)
        "rollout/sampler_logprob_gap": ((batch.sample_logprobs - logprobs).abs() * mask).max(),
    }
    if values is not None:
        metrics["value/explained_variance"] = rl.explained_variance(values, returns, mask)
        metrics["value/mean"] = rl.masked_mean(values, mask)
    return metrics


def ppo_update(model, optimizer, scheduler, accelerator, args: PPOConfig, batch: Rollout, old_logprobs,
               ref_logprobs, advantages, old_values, returns, layout: str = "padded") -> dict[str, float]:
    """`ppo_epochs` passes over the rollout in shuffled minibatches; returns the means of the loss metrics.
    `layout`: the forward's layout (`rlhfkit.rl.rollout.policy_forward`).

    Dropout off (`dropout_free`): the rollout's log-probs came from the same deterministic forward, so the first
    minibatch's ratio is 1 (`policy/first_ratio`, `policy/first_approx_kl` record it: a check of on-policyness).
    """
    dropout_free(model)
    total = batch.responses.shape[0]
    micro = args.per_device_train_batch_size
    accumulation = args.gradient_accumulation_steps
    # --mask_truncated_completions: truncated responses leave the policy loss (the value loss keeps them)
    policy_mask = objectives.mask_truncated(batch.mask, batch.has_stop) if args.mask_truncated_completions \
        else batch.mask
    sums: dict[str, float] = {}
    count = 0
    for _ in range(args.ppo_epochs):
        order = torch.randperm(total, device=batch.responses.device)
        # token aggregation divides by the tokens of the whole optimizer minibatch (all its micro-batches, all
        # processes): count them per accumulation window before the window starts
        window_rows = micro * accumulation
        window_tokens = torch.stack([policy_mask[order[start : start + window_rows]].sum()
                                     for start in range(0, total, window_rows)])
        window_tokens = accelerator.gather(window_tokens.reshape(1, -1)).float().mean(dim=0)  # N / P per window
        for start in range(0, total, micro):
            rows = order[start : start + micro]
            mask = batch.mask[rows]
            loss_mask = policy_mask[rows]
            with accelerator.accumulate(model):
                logprobs, entropies, values = policy_forward(model, batch, rows, args.temperature, layout,
                                                             entropy=True)
                ref_kl = rl.kl_per_token(logprobs, ref_logprobs[rows], "k3") if args.kl_loss_coef else None
                loss, metrics = objectives.policy_objective(
                    logprobs, old_logprobs[rows], advantages[rows], loss_mask, metrics_mask=mask,
                    clip_low=args.cliprange_low, clip_high=args.cliprange_high, policy_loss=args.policy_loss,
                    aggregation=args.loss_aggregation, importance_sampling_level=args.importance_sampling_level,
                    ref_kl=ref_kl, kl_coef=args.kl_loss_coef, kl_importance_weighted=args.kl_loss_importance_weighted,
                    max_completion_length=args.max_new_tokens,
                    num_tokens=objectives.token_normalizer(float(window_tokens[start // window_rows]), accumulation),
                )
                metrics = {f"policy/{k}": v for k, v in metrics.items()}
                entropy = rl.masked_mean(entropies, mask)
                metrics["policy/entropy"] = entropy.detach()
                if args.entropy_coef:
                    loss = loss - args.entropy_coef * entropy
                if ref_kl is not None:
                    metrics["policy/kl_loss"] = rl.masked_mean(ref_kl, loss_mask).detach()
                if values is not None:
                    vf_loss, vf_metrics = rl.value_loss(
                        values, old_values[rows], returns[rows], mask, args.cliprange_value
                    )
                    loss = loss + args.vf_coef * vf_loss
                    metrics["value/loss"] = vf_loss.detach()
                    metrics["value/clipfrac"] = vf_metrics["vf_clipfrac"]
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if args.max_grad_norm and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            if count == 0:
                first = {"policy/first_ratio": float(metrics["policy/ratio"]),
                         "policy/first_approx_kl": float(metrics["policy/approx_kl"])}
            count += 1
            del entropies, values, logprobs, loss
    return {**{key: value / max(count, 1) for key, value in sums.items()}, **(first if count else {})}


def save_checkpoint(accelerator, out: StageOutput, step: int, history: list[dict], save_total_limit: int | None):
    """accelerate state (model, optimizer, scheduler, RNG, KL controller, reward moments) + our step counter.

    Written to a hidden temp dir and renamed, so a kill during saving never leaves a half checkpoint as "the last".
    """
    final = out.checkpoints / f"checkpoint-{step}"
    temp = out.checkpoints / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    if accelerator.is_main_process:
        write_json_atomic(temp / TRAINER_STATE, {"step": step, "log_history": history})
    seal_checkpoint(temp, accelerator.is_main_process)  # checksums.json last, once every rank's files are written
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temp, final)
        if save_total_limit:
            numbered = [(p.name.split("-")[1], p) for p in out.checkpoints.glob("checkpoint-*")]
            kept = sorted((int(number), p) for number, p in numbered if number.isdigit())
            for _, old in kept[: -save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_pretrained_from_state(model, state_dict: dict, out_dir: Path, merge_lora: bool) -> None:
    """Save one submodel from its (gathered) state dict: LoRA merged into the weights unless asked otherwise.

    Merging the state dict rather than calling `merge_and_unload` works the same with or without ZeRO-3.
    """
    from accelerate.utils import is_peft_model

    if is_peft_model(model) and merge_lora:
        merged = merge_lora_state_dict(state_dict, model.peft_config["default"])
        model.get_base_model().save_pretrained(out_dir, state_dict=merged, safe_serialization=True)
    else:
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)


def sub_state_dict(state_dict: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def trackers_from_report_to(value) -> list[str] | None:
    if value in (None, "none", ["none"], []):
        return None
    trackers = [value] if isinstance(value, str) else list(value)
    return [t for t in trackers if t != "none"] or None

