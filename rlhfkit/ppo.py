"""The PPO stage's machinery (ppo_train.py is the thin stage script): reward sources, the policy+value module,
rollouts, scoring, the PPO update and checkpoint bookkeeping. The math itself lives in `rlhfkit.rl` as pure
functions; this module wires it to models, tokenizers, accelerate and DeepSpeed.

Written by hand because no maintained library provides PPO with a critic any more (TRL removed `PPOTrainer`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import rl
from .checkpoints import StageOutput, check_parent, merge_lora_state_dict, write_json_atomic
from .errors import UserError

if TYPE_CHECKING:  # for annotations only
    from ppo_train import PPOConfig

    from .args import ModelArguments

logger = logging.getLogger("rlhfkit.ppo")

VALUE_MODEL_DIR = "value_model"
TRAINER_STATE = "trainer_state.json"

# ---------------------------------------------------------------------------------------------------------------
# rewards: one interface for reward models and Python functions
# ---------------------------------------------------------------------------------------------------------------
class FunctionReward:
    """A labeler (`rlhfkit.labelers`: a built-in such as `vader`, or `module:function` / `file.py:function`) behind
    the same interface as a reward model; the annotation stage scores responses with the same objects."""

    def __init__(self, spec: str):
        from rlhfkit.labelers import load_labeler

        self.spec = spec
        self.labeler = load_labeler(spec, flag="--reward_fn")
        self.stats = None

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        return self.labeler(prompts, responses)

    def describe(self) -> dict:
        return {"reward_fn": self.spec, **self.labeler.info}


class ModelReward:
    """A reward model scoring `prompt + [assistant: response text]` rendered with its own tokenizer and template.

    Re-rendering (rather than feeding the policy's token ids) is what lets the RM have another tokenizer or chat
    template than the policy.
    """

    def __init__(self, path: str, model_args: ModelArguments, batch_size: int = 16, max_length: int | None = None):
        from rlhfkit.models import ensure_pad_token, load_reward_model, load_tokenizer, model_init_kwargs

        self.path = path
        self.info = check_parent(path, role="reward model")
        self.tokenizer = load_tokenizer(path)
        kwargs = model_init_kwargs(model_args)
        kwargs.pop("quantization_config", None)  # the frozen RM is not trained; keep its scores exact
        self.model = load_reward_model(path, **kwargs)
        ensure_pad_token(self.tokenizer, self.model)
        self.model.requires_grad_(False).eval()
        run_info = self.info["run_info"] or {}
        stats = run_info.get("reward_stats")
        self.stats = None
        if stats is not None:
            try:
                self.stats = {"mean": float(stats["mean"]), "std": float(stats["std"])}
            except (KeyError, TypeError, ValueError):
                raise UserError(
                    f"{path}/run_info.json: field 'reward_stats': expected {{'mean': x, 'std': y}}"
                ) from None
        self.batch_size, self.max_length = batch_size, max_length

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        from rlhfkit.scoring import score_conversations

        conversations = [list(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        return score_conversations(self.model, self.tokenizer, conversations, self.batch_size, self.max_length)

    def describe(self) -> dict:
        return {"reward_model": os.path.abspath(self.path), "reward_stats": self.stats}


def checked_scores(raw, count: int, source: str) -> torch.Tensor:
    """The reward source's output as a float tensor, refusing the wrong length or non-finite values."""
    try:
        scores = torch.tensor([float(x) for x in raw], dtype=torch.float32)
    except (TypeError, ValueError):
        raise UserError(f"{source}: must return a list of numbers, got {type(raw).__name__}") from None
    if scores.numel() != count:
        raise UserError(f"{source}: returned {scores.numel()} scores for {count} responses")
    if not torch.isfinite(scores).all():
        raise UserError(f"{source}: returned a non-finite score (NaN or inf)")
    return scores


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------
def is_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def prepare_frozen(model, accelerator):
    """Frozen models: sharded by DeepSpeed under ZeRO-3, else one copy per process on its device."""
    if is_deepspeed(accelerator):
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    return model.to(accelerator.device)


def value_head(model) -> nn.Module:
    from rlhfkit.models import reward_head_names

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "score"):
        raise UserError(
            f"value model: needs a decoder sequence-classification model with a linear 'score' head, got "
            f"{type(base).__name__} (heads: {reward_head_names(base)})"
        )
    return base.score


def token_values(value_model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """Per-position values [B, L]: the RM's head applied to every hidden state, not only the last one."""
    base = value_model.get_base_model() if hasattr(value_model, "get_base_model") else value_model
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return value_head(value_model)(hidden).squeeze(-1).float()


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so one optimizer and one DeepSpeed engine train both."""

    def __init__(self, policy, value_model=None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.config = policy.config  # accelerate reads hidden_size from here to fill DeepSpeed "auto" buckets

    def forward(self, input_ids, attention_mask, position_ids, response_length: int, temperature: float):
        """Response logits [B, T, V] (temperature applied) and values [B, T] (None without a value model).

        Position t of the output predicts response token t, i.e. reads the sequence up to the token before it.
        """
        output = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=response_length + 1,
            use_cache=False,
        )
        logits = output.logits[:, :-1].float() / temperature
        values = None
        if self.value_model is not None:
            values = token_values(self.value_model, input_ids, attention_mask, position_ids)
            values = values[:, -response_length - 1 : -1]
        return logits, values

    # what trl's unwrap_model_for_generation expects from the model it unwraps
    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.policy, "is_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        for model in (self.policy, self.value_model):
            if model is not None:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        for model in (self.policy, self.value_model):
            if model is not None:
                model.gradient_checkpointing_disable()


def same_vocabulary(tokenizer_a, tokenizer_b) -> bool:
    return tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


def build_value_model(script_args, model_args, policy_path: str, tokenizer, reward) -> tuple[nn.Module, object, str]:
    """The value model, the tokenizer saved beside it, and where it came from ("reward_model" or "policy")."""
    from rlhfkit.models import load_reward_model, load_tokenizer, model_init_kwargs

    choice = script_args.value_model_init
    if choice in ("auto", "reward_model") and isinstance(reward, ModelReward):
        if same_vocabulary(reward.tokenizer, tokenizer):
            choice = "reward_model"
        elif choice == "reward_model":
            raise UserError(
                f"{script_args.reward_model_path}: --value_model_init reward_model needs the reward model to share the "
                f"policy's tokenizer (the value model reads the policy's tokens); use --value_model_init policy"
            )
        else:
            logger.info("reward model has another tokenizer than the policy: value model initialised from the policy")
            choice = "policy"
    elif choice == "auto":
        choice = "policy"
    kwargs = model_init_kwargs(model_args)
    if choice == "reward_model":
        model = load_reward_model(script_args.reward_model_path, **kwargs)
        value_tokenizer = load_tokenizer(script_args.reward_model_path)
    else:
        model = load_reward_model(policy_path, new_head=True, **kwargs)
        value_tokenizer = tokenizer
        # A random head gives per-token values of the order of the rewards themselves, and GAE turns that noise
        # into advantages the policy then follows; a zero head starts from Monte-Carlo returns instead.
        with torch.no_grad():
            for parameter in value_head(model).parameters():
                parameter.zero_()
    model.config.pad_token_id = tokenizer.pad_token_id
    value_head(model)
    return model, value_tokenizer, choice


def apply_lora(model, model_args, task_type: str, modules_to_save=None):
    from peft import get_peft_model

    from rlhfkit.models import peft_config

    config = peft_config(model_args, task_type, modules_to_save)
    return model if config is None else get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------------------------
# rollout
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One step's samples. Rows are prompt-major (prompt i owns rows i·K … i·K+K−1)."""

    prompts: list[list[dict]]  # [B] prompt messages, repeated K times
    texts: list[str]  # [B] decoded responses (no special tokens)
    input_ids: torch.Tensor  # [B, P+T] left-padded prompt followed by the response
    attention_mask: torch.Tensor  # [B, P+T]; 0 on left padding and after the stop token
    position_ids: torch.Tensor  # [B, P+T]
    responses: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] float, response tokens up to and including the stop token
    has_stop: torch.Tensor  # [B] bool


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, matching what `generate` used (else log-probs shift)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def rollout(policy, tokenizer, prompt_rows: list[dict], prompt_ids: list[list[int]], prompt_seeds: list[int],
            args: PPOConfig, stop_ids: list[int], device) -> Rollout:
    """Sample K responses per prompt with `rlhfkit.sampling.generate_batch` and lay them out as tensors."""
    from rlhfkit.sampling import build_prompt_batch, generate_batch, pad_token_id

    k = args.num_samples_per_prompt
    chunk = args.generation_batch_size or len(prompt_rows)
    samples: list[dict] = []
    for start in range(0, len(prompt_rows), chunk):
        rows = prompt_rows[start : start + chunk]
        generated = generate_batch(
            policy, tokenizer, [row["prompt"] for row in rows], n=k, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=None,
            prompt_seeds=prompt_seeds[start : start + chunk], stop_ids=stop_ids,
        )
        samples.extend(sample for per_prompt in generated for sample in per_prompt)
    pad = pad_token_id(tokenizer)
    query = build_prompt_batch([ids for ids in prompt_ids for _ in range(k)], pad)
    width = max(1, max(len(sample["token_ids"]) for sample in samples))
    responses = torch.full((len(samples), width), pad, dtype=torch.long)
    lengths = torch.zeros(len(samples), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids = sample["token_ids"]
        responses[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        lengths[row] = len(ids)
    mask, has_stop = rl.response_mask(responses, stop_ids, lengths)
    attention_mask = torch.cat([query["attention_mask"], mask.long()], dim=1)
    input_ids = torch.cat([query["input_ids"], responses], dim=1)
    return Rollout(
        prompts=[row["prompt"] for row in prompt_rows for _ in range(k)],
        texts=[sample["text"] for sample in samples],
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=positions_from_mask(attention_mask).to(device),
        responses=responses.to(device),
        mask=mask.to(device),
        has_stop=has_stop.to(device),
    )


@torch.no_grad()
def forward_rollout(model, batch: Rollout, micro_batch: int, temperature: float):
    """Log-probs of the sampled tokens [B, T] and values [B, T] (or None), in micro batches, without grad."""
    logprobs, values = [], []
    width = batch.responses.shape[1]
    for start in range(0, batch.responses.shape[0], micro_batch):
        rows = slice(start, start + micro_batch)
        logits, value = model(
            batch.input_ids[rows], batch.attention_mask[rows], batch.position_ids[rows], width, temperature
        )
        logprobs.append(rl.logprobs_from_logits(logits, batch.responses[rows]))
        if value is not None:
            values.append(value)
        del logits
    return torch.cat(logprobs), (torch.cat(values) if values else None)


@torch.no_grad()
def reference_logprobs(ref_model, policy_unwrapped, batch: Rollout, micro_batch: int, temperature: float):
    """Log-probs under the frozen reference; with LoRA and no separate reference, the policy with adapters off."""
    width = batch.responses.shape[1]
    context = contextlib.nullcontext()
    model = ref_model
    if ref_model is None:
        context = policy_unwrapped.disable_adapter()
        model = policy_unwrapped
    out = []
    with context:
        for start in range(0, batch.responses.shape[0], micro_batch):
            rows = slice(start, start + micro_batch)
            logits = model(
                input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
                position_ids=batch.position_ids[rows], logits_to_keep=width + 1, use_cache=False,
            ).logits[:, :-1].float() / temperature
            out.append(rl.logprobs_from_logits(logits, batch.responses[rows]))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------------------------
def compute_advantages(args: PPOConfig, scores, kl, mask, values, kl_coef: float):
    """Advantages [B, T] and value targets [B, T] (None without a critic) for the chosen estimator."""
    returns = None
    if args.advantage_estimator == "gae":
        rewards, _ = rl.token_rewards(scores, kl, mask, kl_coef)
        if args.whiten_rewards:
            rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = rl.gae_advantages(rewards, values, mask, args.gamma, args.lam)
    elif args.advantage_estimator == "reinforce_pp":
        rewards, _ = rl.token_rewards(scores, kl, mask, kl_coef)
        advantages = rl.reinforce_pp_advantages(rewards, mask, args.gamma)
    else:
        sequence = rl.sequence_rewards(scores, kl, mask, kl_coef)
        k = args.num_samples_per_prompt
        if args.advantage_estimator == "rloo":
            per_sequence = rl.rloo_advantages(sequence, k)
        else:
            per_sequence = rl.grpo_advantages(sequence, k, scale=args.grpo_scale_by_std)
        advantages = rl.broadcast_to_tokens(per_sequence, mask)
    if args.whiten_advantages and args.advantage_estimator != "reinforce_pp":  # REINFORCE++ is whitened already
        advantages = rl.masked_whiten(advantages, mask)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------------
# scores and per-step metrics
# ---------------------------------------------------------------------------------------------------------------
def score(reward, batch: Rollout, args: PPOConfig, norm_mode: str, moments: rl.RunningMoments, accelerator,
          source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scores [B] from the reward source, and the scores the RL objective uses (normalised, penalised, clipped)."""
    raw = checked_scores(reward(batch.prompts, batch.texts), len(batch.texts), source).to(accelerator.device)
    if norm_mode == "running":
        moments.update(accelerator.gather(raw))  # the same statistics on every process
        mean, std = moments.mean, moments.std
    elif norm_mode == "rm_stats":
        mean, std = reward.stats["mean"], reward.stats["std"]
    else:
        mean = std = None
    return raw, rl.shape_scores(raw, batch.has_stop, mean, std, args.missing_eos_penalty, args.reward_clip)


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
    }
    if values is not None:
        metrics["value/explained_variance"] = rl.explained_variance(values, returns, mask)
        metrics["value/mean"] = rl.masked_mean(values, mask)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# update
# ---------------------------------------------------------------------------------------------------------------
def ppo_update(model, optimizer, scheduler, accelerator, args: PPOConfig, batch: Rollout, old_logprobs,
               ref_logprobs, advantages, old_values, returns) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout in shuffled minibatches; returns the means of the loss metrics."""
    model.train()
    total = batch.responses.shape[0]
    micro = args.per_device_train_batch_size
    width = batch.responses.shape[1]
    sums: dict[str, float] = {}
    count = 0
    for _ in range(args.ppo_epochs):
        order = torch.randperm(total, device=batch.responses.device)
        for start in range(0, total, micro):
            rows = order[start : start + micro]
            mask = batch.mask[rows]
            with accelerator.accumulate(model):
                logits, values = model(
                    batch.input_ids[rows], batch.attention_mask[rows], batch.position_ids[rows], width, args.temperature
                )
                logprobs = rl.logprobs_from_logits(logits, batch.responses[rows])
                loss, metrics = rl.policy_loss(logprobs, old_logprobs[rows], advantages[rows], mask, args.cliprange)
                metrics = {"policy/pg_loss": loss.detach(), **{f"policy/{k}": v for k, v in metrics.items()}}
                entropy = rl.masked_mean(rl.entropy_from_logits(logits), mask)
                metrics["policy/entropy"] = entropy.detach()
                if args.entropy_coef:
                    loss = loss - args.entropy_coef * entropy
                if args.kl_loss_coef:
                    kl_loss = rl.masked_mean(rl.kl_per_token(logprobs, ref_logprobs[rows], "k3"), mask)
                    loss = loss + args.kl_loss_coef * kl_loss
                    metrics["policy/kl_loss"] = kl_loss.detach()
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
            count += 1
            del logits, values, logprobs, loss
    return {key: value / max(count, 1) for key, value in sums.items()}


# ---------------------------------------------------------------------------------------------------------------
# bookkeeping: prompt order, checkpoints, saving
# ---------------------------------------------------------------------------------------------------------------
def prompt_positions(step: int, per_step: int, n_prompts: int, seed: int) -> list[int]:
    """Indices of the prompts of PPO step `step` (all processes): a fresh permutation each pass over the data.

    A function of the step alone, so a resumed run takes the same prompts as an uninterrupted one.
    """
    start = step * per_step
    out = []
    while len(out) < per_step:
        position = start + len(out)
        epoch, offset = divmod(position, n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        take = min(per_step - len(out), n_prompts - offset)
        out.extend(order[offset : offset + take])
    return out


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
