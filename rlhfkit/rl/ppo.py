"""The PPO stage's machinery (ppo_train.py is the thin stage script): its config (`PPOConfig`), reward sources,
the policy+value module, rollouts, scoring, advantages, the PPO update and checkpoint bookkeeping. The math itself
lives in `rlhfkit.rl.estimators` as pure functions; this module wires it to models, tokenizers, accelerate and DeepSpeed, and
the stage's loop talks to this module only.

On-policy by construction: rollouts sample softmax(logits / temperature) with our own decoding loop
(`rlhfkit.sampling.decode`), ignoring the checkpoint's `generation_config.json` processors (logged when there are
any); `--suppress_tokens` is the one processor RL can ask for, and it is applied both in the sampler and in
`PolicyAndValue.forward` / `reference_logprobs`. Updates run dropout-free (`dropout_free`), so at the first
minibatch of the first epoch the ratio is exactly 1 (logged as `policy/first_ratio`, `policy/first_approx_kl`).

Written by hand because no maintained library provides PPO with a critic any more (TRL removed `PPOTrainer`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import TrainingArguments

from rlhfkit.rl import estimators as rl
from rlhfkit.checkpoints import StageOutput, merge_lora_state_dict, write_json_atomic
from rlhfkit.errors import UserError
from rlhfkit.faults import seal_checkpoint
from rlhfkit.rl.estimators import AdvantageEstimator, RunningMoments  # noqa: F401  (the loop reaches them as ppo.*)
from rlhfkit.rl import objectives, rewards
from rlhfkit.rl.rewards import FunctionReward, ModelReward  # noqa: F401  (reward sources: rlhfkit/rl/rewards.py)

logger = logging.getLogger("rlhfkit.rl.ppo")

VALUE_MODEL_DIR = "value_model"
TRAINER_STATE = "trainer_state.json"

# ---------------------------------------------------------------------------------------------------------------
# the config
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PPOConfig(TrainingArguments):
    """Training flags: HF TrainingArguments (optimizer, schedule, precision, logging, saving) plus PPO's own.

    Read by this loop: learning_rate, weight_decay, adam_*, max_grad_norm, lr_scheduler_type, warmup_steps,
    max_steps (PPO steps; else num_train_epochs passes over the prompts), per_device_train_batch_size (micro batch
    of the update), gradient_accumulation_steps, gradient_checkpointing, bf16/fp16, seed, logging_steps,
    save_strategy/save_steps/save_total_limit, report_to, output_dir, resume_from_checkpoint, disable_tqdm.
    Evaluation and hub fields are not used.
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "Learning rate of the policy."})
    preemption_signals: str = field(
        default="SIGTERM,SIGUSR1",
        metadata={"help": "Signals that mean 'preempted': save a checkpoint at the end of the current PPO step and "
                  "exit 75 (resume with --resume_from_checkpoint true); 'none' keeps the default."},
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N PPO steps."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N PPO steps."})
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Sequences per forward/backward in the update."}
    )

    rollout_batch_size: int = field(default=8, metadata={"help": "Prompts per process per PPO step."})
    num_samples_per_prompt: int = field(default=1, metadata={"help": "K responses per prompt (≥ 2 for rloo/grpo)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Response length limit."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs use the same)."})
    top_p: float = field(
        default=1.0,
        metadata={"help": "Must stay 1: PPO samples the full softmax(logits / temperature) its log-probs model."},
    )
    suppress_tokens: list[str] | None = field(
        default=None,
        metadata={"help": "Tokens (strings or ids) the policy may never emit: removed from the sampling distribution "
                  "and from the policy's and reference's log-probs alike, so the rollouts stay on-policy. The "
                  "checkpoint's generation_config.json processors are never applied during RL."},
    )
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Prompts per generate call (default: the whole rollout batch)."}
    )
    use_vllm: bool = field(
        default=False,
        metadata={"help": "Roll out on a colocated vLLM engine (rlhfkit/rl/vllm_rollout.py): the policy (LoRA merged) "
                  "is pushed into it after every step and the push checked on a probe sequence."},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "--use_vllm on a GPU: share of its memory the engine may take (it sleeps "
                               "during the update)."}
    )
    vllm_kv_cache_gib: float | None = field(
        default=None, metadata={"help": "--use_vllm: the engine's KV cache in GiB (CPU default: 1, or "
                                "VLLM_CPU_KVCACHE_SPACE)."}
    )
    vllm_sync_tolerance: float | None = field(
        default=None,
        metadata={"help": "--use_vllm: largest |log-prob| gap on the probe sequence between engine and policy after a "
                  "push (default by dtype: float32 1e-3, bfloat16 1.0, float16 0.5); above it the run stops."},
    )
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={"help": "--use_vllm: weight each token's policy loss by the truncated importance ratio "
                  "min(π_trainer/π_vllm, cap) (TRL's token_truncate mode)."},
    )
    vllm_importance_sampling_cap: float = field(
        default=3.0, metadata={"help": "Cap of the truncated importance ratio (TRL's clip_max, default 3)."}
    )

    advantage_estimator: str = field(default="gae", metadata={"help": "gae | rloo | grpo | reinforce_pp."})
    gamma: float = field(default=1.0, metadata={"help": "Discount (GAE, REINFORCE++)."})
    lam: float = field(default=0.95, metadata={"help": "GAE λ."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages over the rollout batch."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Rescale per-token rewards (GAE) by their std."})
    grpo_scale_by_std: bool = field(default=True, metadata={"help": "GRPO: divide by the group std (false: Dr. GRPO)."})

    kl_estimator: str = field(default="k1", metadata={"help": "k1 | k3 (k2 also accepted): per-token KL estimate."})
    kl_coef: float = field(
        default=0.05, metadata={"help": "β of the KL penalty in the reward (initial β if adaptive)."}
    )
    kl_target: float | None = field(
        default=None, metadata={"help": "Adaptive KL: target per-sequence KL (Ziegler et al.); unset = fixed β."}
    )
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL horizon, in sequences."})
    kl_loss_coef: float = field(default=0.0, metadata={"help": "KL (k3) to the reference as a loss term (GRPO style)."})
    kl_loss_importance_weighted: bool = field(
        default=False,
        metadata={"help": "Multiply the KL loss term by the importance ratio (TRL 1.16 use_bias_correction_kl, its "
                  "default; DeepSeek-V3.2, arXiv 2512.02556). Off: β·k3 as verl's kl_loss adds it."},
    )

    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    cliprange: float = field(default=0.2, metadata={"help": "PPO ratio clip ε."})
    cliprange_low: float | None = field(
        default=None, metadata={"help": "Lower clip: the ratio is clipped at 1 − this (default --cliprange)."}
    )
    cliprange_high: float | None = field(
        default=None,
        metadata={"help": "Upper clip: the ratio is clipped at 1 + this (default --cliprange); DAPO's clip-higher "
                  "uses 0.28 with 0.2 below (Yu et al. 2025, arXiv 2503.14476; TRL epsilon_high, verl "
                  "clip_ratio_high)."},
    )
    policy_loss: str = field(
        default="ppo",
        metadata={"help": "ppo (clipped surrogate) | cispo (MiniMax-M1, arXiv 2506.13585: −sg(clip(w))·A·log π, the "
                  "gradient of every token kept; TRL's cap-only clip is --cliprange_low 1 --cliprange_high cap−1)."},
    )
    loss_aggregation: str = field(
        default="token",
        metadata={"help": "How per-token losses become one number (rlhfkit/rl/objectives.py): token = Σ over the "
                  "optimizer minibatch's tokens ÷ their count (DAPO; TRL loss_type dapo, its default) | sequence "
                  "= mean over sequences of each one's token mean (GRPO paper; TRL grpo) | dr_grpo = Σ ÷ (B × "
                  "--max_new_tokens) (Dr. GRPO, arXiv 2503.20783; TRL dr_grpo) | bnpo = the micro-batch's token "
                  "mean (TRL bnpo)."},
    )
    importance_sampling_level: str = field(
        default="token",
        metadata={"help": "token: a ratio per token | sequence: one ratio per response, exp(mean_t log ρ_t) (GSPO, "
                  "Zheng et al. 2025, arXiv 2507.18071; TRL importance_sampling_level)."},
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={"help": "Responses cut at --max_new_tokens (no stop token) leave the policy loss (DAPO overlong "
                  "filtering; TRL mask_truncated_completions). They still count in their group's reward statistics."},
    )
    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "DAPO dynamic sampling (arXiv 2503.14476 §3.2, verl recipe/dapo): drop prompts whose K "
                  "samples all score the same (zero advantage, no gradient) and sample further prompts until "
                  "--rollout_batch_size prompts with a signal are in hand, at most --dynamic_sampling_max_batches "
                  "generation batches a step; short of that, dropped groups fill the batch (logged)."},
    )
    dynamic_sampling_max_batches: int = field(
        default=4, metadata={"help": "Cap on generation batches per step under --dynamic_sampling (the first "
                             "included; verl max_num_gen_batches)."}
    )
    overlong_penalty: bool = field(
        default=False,
        metadata={"help": "DAPO soft overlong punishment (arXiv 2503.14476 eq. 13; verl reward_manager/dapo.py; TRL "
                  "get_soft_overlong_punishment): a response longer than --max_new_tokens − buffer gets "
                  "−factor × (length − (max − buffer)) / buffer added to its reward, logged as reward/overlong."},
    )
    overlong_buffer_length: int | None = field(
        default=None, metadata={"help": "The penalty's buffer in tokens (default: --max_new_tokens / 5, DAPO's "
                                "4096 of 20480)."}
    )
    overlong_penalty_factor: float = field(default=1.0, metadata={"help": "The penalty at --max_new_tokens (DAPO: 1)."})
    cliprange_value: float | None = field(default=0.2, metadata={"help": "Value clip; unset = unclipped MSE."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    value_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the value model (default: --learning_rate)."}
    )
    entropy_coef: float = field(default=0.0, metadata={"help": "Entropy bonus weight."})

    reward_normalization: str = field(
        default="auto",
        metadata={"help": "auto (the RM's reward_stats if present, else none) | rm_stats | running | none."},
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the (normalised) score of responses without a stop token."}
    )
    reward_clip: float | None = field(default=None, metadata={"help": "Clip normalised scores to ±this."})
    save_value_model: bool = field(default=True, metadata={"help": "Save the value model in OUT/value_model/."})

    def __post_init__(self):
        super().__post_init__()
        if self.vllm_importance_sampling_correction and not self.use_vllm:
            raise ValueError("--vllm_importance_sampling_correction needs --use_vllm true")
        if self.vllm_importance_sampling_cap <= 0:
            raise ValueError("--vllm_importance_sampling_cap must be > 0")
        if self.advantage_estimator not in rl.ADVANTAGE_ESTIMATORS:
            raise ValueError(f"--advantage_estimator must be one of {', '.join(rl.ADVANTAGE_ESTIMATORS)}")
        estimator = AdvantageEstimator.parse(self.advantage_estimator)
        if self.kl_estimator not in rl.KL_ESTIMATORS:
            raise ValueError(f"--kl_estimator must be one of {', '.join(rl.KL_ESTIMATORS)}")
        if self.num_samples_per_prompt < estimator.min_samples_per_prompt:
            raise ValueError(f"--advantage_estimator {estimator} needs --num_samples_per_prompt ≥ "
                             f"{estimator.min_samples_per_prompt}")
        if self.top_p != 1.0:
            raise ValueError("--top_p must be 1 in PPO: nucleus samples come from a truncated distribution that the "
                             "ratio and the KL do not model; lower --temperature instead")
        if self.reward_normalization not in ("auto", "rm_stats", "running", "none"):
            raise ValueError("--reward_normalization must be auto, rm_stats, running or none")
        rollout = self.rollout_batch_size * self.num_samples_per_prompt
        minibatch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if rollout % minibatch:
            raise ValueError(
                f"rollout of {rollout} sequences (rollout_batch_size × num_samples_per_prompt) does not split into "
                f"minibatches of {minibatch} (per_device_train_batch_size × gradient_accumulation_steps)"
            )
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0 (PPO needs a stochastic policy)")
        from rlhfkit.rl.objectives import IMPORTANCE_SAMPLING_LEVELS, LOSS_AGGREGATIONS, POLICY_LOSSES

        for flag, value, choices in (("policy_loss", self.policy_loss, POLICY_LOSSES),
                                     ("loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS),
                                     ("importance_sampling_level", self.importance_sampling_level,
                                      IMPORTANCE_SAMPLING_LEVELS)):
            if value not in choices:
                raise ValueError(f"--{flag} must be one of {', '.join(choices)}, not '{value}'")
        for flag in ("cliprange_low", "cliprange_high"):
            if getattr(self, flag) is None:
                setattr(self, flag, self.cliprange)
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be ≥ 0")
        if self.dynamic_sampling and estimator.min_samples_per_prompt < 2:
            raise ValueError("--dynamic_sampling filters groups of samples: use --advantage_estimator grpo or rloo")
        if self.dynamic_sampling_max_batches < 1:
            raise ValueError("--dynamic_sampling_max_batches must be ≥ 1")
        if self.overlong_buffer_length is None:
            self.overlong_buffer_length = max(1, self.max_new_tokens // 5)
        if self.overlong_penalty and not 0 < self.overlong_buffer_length <= self.max_new_tokens:
            raise ValueError(f"--overlong_buffer_length must be in 1..--max_new_tokens ({self.max_new_tokens})")

    @property
    def estimator(self) -> AdvantageEstimator:
        return AdvantageEstimator.parse(self.advantage_estimator)


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

    def __init__(self, policy, value_model=None, suppressed_tokens: list[int] | None = None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.suppressed_tokens = list(suppressed_tokens or [])  # the sampler removes the same ids
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
        logits = suppress_tokens(output.logits[:, :-1].float(), self.suppressed_tokens) / temperature
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


def suppress_tokens(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    from rlhfkit.sampling import suppress_tokens as suppress

    return suppress(logits, token_ids)


def suppressed_token_ids(tokenizer, specs: list[str] | None) -> list[int]:
    """`--suppress_tokens` entries (token strings or ids) as ids; an unknown token is a one-line error."""
    ids = []
    for spec in specs or []:
        spec = str(spec)
        if spec.lstrip("-").isdigit():
            token_id = int(spec)
        else:
            token_id = tokenizer.convert_tokens_to_ids(spec)
            if token_id is None or (token_id == tokenizer.unk_token_id and spec != tokenizer.unk_token):
                raise UserError(f"--suppress_tokens: '{spec}' is not one token of the policy's tokenizer")
        if not 0 <= token_id < len(tokenizer):
            raise UserError(f"--suppress_tokens: id {token_id} is outside the vocabulary (0..{len(tokenizer) - 1})")
        ids.append(int(token_id))
    return sorted(set(ids))


def log_ignored_generation_config(policy) -> dict:
    """Say which of the checkpoint's generation_config.json processors RL does not apply (they would make the
    rollouts off-policy); returns them for run_info.json."""
    from rlhfkit.sampling import checkpoint_processor_settings

    ignored = {key: value for key, value in checkpoint_processor_settings(policy).items()}
    if ignored:
        logger.warning("rollouts sample softmax(logits / temperature); the checkpoint's generation_config.json "
                       "processors are not applied during RL: %s (ask for suppressed tokens with --suppress_tokens)",
                       ", ".join(f"{key}={value}" for key, value in ignored.items()))
    return {key: value if isinstance(value, (int, float, str, list, bool)) else str(value)
            for key, value in ignored.items()}


def same_vocabulary(tokenizer_a, tokenizer_b) -> bool:
    return tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


def load_reference(ref_path: str, model_args, policy, vocab_before_pad: int, tokenizer, requested: str):
    """The frozen reference, with the policy's pad-token resize followed (it scores the same ids, pads included)."""
    from rlhfkit.models import load_causal_lm, match_vocabulary

    ref_model = load_causal_lm(ref_path, model_args)
    match_vocabulary(ref_model, policy, vocab_before_pad, requested)
    ref_model.config.pad_token_id = tokenizer.pad_token_id
    return ref_model.requires_grad_(False).eval()


def build_value_model(script_args, model_args, policy_path: str, tokenizer, reward, policy=None,
                      vocab_before_pad: int | None = None) -> tuple[nn.Module, object, str]:
    """The value model, the tokenizer saved beside it, and where it came from ("reward_model" or "policy").

    `reward`: the reward model to initialise from (a `ModelReward`), or None. It reads the policy's token ids, so
    its embeddings follow the policy's pad-token resize (`policy` and
    `vocab_before_pad`, the policy's embedding rows before `ensure_pad_token`).
    """
    from rlhfkit.models import load_reward_model, load_tokenizer, match_vocabulary, model_init_kwargs

    choice = script_args.value_model_init
    if choice == "reward_model" and not isinstance(reward, ModelReward):
        raise UserError("--value_model_init reward_model needs a scalar reward model among --reward_model_path")
    if choice in ("auto", "reward_model") and isinstance(reward, ModelReward):
        if same_vocabulary(reward.tokenizer, tokenizer):
            choice = "reward_model"
        elif choice == "reward_model":
            raise UserError(
                f"{reward.path}: --value_model_init reward_model needs the reward model to share the "
                f"policy's tokenizer (the value model reads the policy's tokens); use --value_model_init policy"
            )
        else:
            logger.info("reward model has another tokenizer than the policy: value model initialised from the policy")
            choice = "policy"
    elif choice == "auto":
        choice = "policy"
    kwargs = model_init_kwargs(model_args)
    if choice == "reward_model":
        model = load_reward_model(reward.path, **kwargs)
        value_tokenizer = load_tokenizer(reward.path)
    else:
        model = load_reward_model(policy_path, new_head=True, **kwargs)
        value_tokenizer = tokenizer
        # A random head gives per-token values of the order of the rewards themselves, and GAE turns that noise
        # into advantages the policy then follows; a zero head starts from Monte-Carlo returns instead.
        with torch.no_grad():
            for parameter in value_head(model).parameters():
                parameter.zero_()
    if policy is not None:
        requested = reward.path if choice == "reward_model" else policy_path
        match_vocabulary(model, policy, vocab_before_pad or policy.get_input_embeddings().num_embeddings, requested)
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
    sample_logprobs: torch.Tensor  # [B, T] log-probs of the sampling distribution (0 on padding)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, matching what `generate` used (else log-probs shift)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def rollout(policy, tokenizer, prompt_rows: list[dict], prompt_ids: list[list[int]], prompt_seeds: list[int],
            args: PPOConfig, stop_ids: list[int], device, sampler=None) -> Rollout:
    """Sample K responses per prompt with `rlhfkit.sampling.generate_batch` and lay them out as tensors.

    sampler: instead, `sampler(prompt_ids, prompt_seeds, K)` returning the samples flattened prompt-major in
    generate_batch's dicts (the vLLM engine, `rlhfkit.rl.vllm_rollout.VLLMRollout.generate`); `policy` is unused."""
    from rlhfkit.sampling import build_prompt_batch, generate_batch, pad_token_id

    k = args.num_samples_per_prompt
    chunk = args.generation_batch_size or len(prompt_rows)
    suppressed = suppressed_token_ids(tokenizer, args.suppress_tokens)
    samples: list[dict] = [] if sampler is None else list(sampler(prompt_ids, prompt_seeds, k))
    for start in range(0, len(prompt_rows) if sampler is None else 0, chunk):
        rows = prompt_rows[start : start + chunk]
        generated = generate_batch(  # raw logits / T: never the checkpoint's generation_config processors
            policy, tokenizer, [row["prompt"] for row in rows], n=k, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=None,
            prompt_seeds=prompt_seeds[start : start + chunk], stop_ids=stop_ids, suppressed_tokens=suppressed,
        )
        samples.extend(sample for per_prompt in generated for sample in per_prompt)
    pad = pad_token_id(tokenizer)
    query = build_prompt_batch([ids for ids in prompt_ids for _ in range(k)], pad)
    width = max(1, max(len(sample["token_ids"]) for sample in samples))
    responses = torch.full((len(samples), width), pad, dtype=torch.long)
    sample_logprobs = torch.zeros((len(samples), width), dtype=torch.float32)
    lengths = torch.zeros(len(samples), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids = sample["token_ids"]
        responses[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if "logprobs" in sample:
            sample_logprobs[row, : len(ids)] = torch.tensor(sample["logprobs"], dtype=torch.float32)
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
        sample_logprobs=sample_logprobs.to(device),
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
def reference_logprobs(ref_model, policy_unwrapped, batch: Rollout, micro_batch: int, temperature: float,
                       suppressed: list[int] | None = None):
    """Log-probs under the frozen reference; with LoRA and no separate reference, the policy with adapters off.

    `suppressed`: the tokens the policy may not emit are removed from the reference too, so the KL compares the
    two distributions over the same support."""
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
            ).logits[:, :-1].float()
            logits = suppress_tokens(logits, suppressed or []) / temperature
            out.append(rl.logprobs_from_logits(logits, batch.responses[rows]))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------------------------
def compute_advantages(args: PPOConfig, scores, kl, mask, values, kl_coef: float, step_rewards=None):
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


# ---------------------------------------------------------------------------------------------------------------
# scores and per-step metrics
# ---------------------------------------------------------------------------------------------------------------
def build_reward_sources(script_args, model_args) -> list[rewards.WeightedReward]:
    """The stage's weighted reward sources (`rlhfkit.rl.rewards.build_reward_sources`), with the prompt-set
    independent checks done; logged once."""
    sources = rewards.build_reward_sources(script_args, model_args)
    logger.info("reward = %s", " + ".join(f"{item.weight:g} × {item.key}" for item in sources))
    return sources


def normalization_mode(requested: str, sources: list[rewards.WeightedReward]) -> str:
    """--reward_normalization resolved: auto → rm_stats when a source has reward statistics (a reward model from
    rm_train.py), else none. rm_stats standardises each such source by its own statistics."""
    with_stats = [item for item in sources if item.source.stats is not None]
    if requested == "auto":
        return "rm_stats" if with_stats else "none"
    if requested == "rm_stats" and not with_stats:
        raise UserError("--reward_normalization rm_stats: no reward model's run_info.json has 'reward_stats'")
    return requested


def place_reward_models(sources: list[rewards.WeightedReward], accelerator) -> None:
    """Frozen reward models onto the device (sharded under ZeRO-3 where the class allows it)."""
    from rlhfkit.rl.model_rewards import PreferenceReward, ProcessReward

    for item in sources:
        if isinstance(item.source, ModelReward):
            item.source.model = prepare_frozen(item.source.model, accelerator)
        elif isinstance(item.source, (PreferenceReward, ProcessReward)):  # rlhfkit/rl/model_rewards.py
            item.source.scorer.model.to(accelerator.device)


@dataclass
class Scored:
    """One rollout's rewards: what was measured and what the objective uses (all [B], prompt-major)."""

    raw: torch.Tensor  # Σ_i w_i · raw score of source i (reward/raw)
    scores: torch.Tensor  # what the advantages see: sources normalised and combined, penalised, clipped
    components: dict[str, torch.Tensor]  # key → raw scores of that source (reward/<key>)
    overlong: torch.Tensor | None  # the DAPO overlong penalty added to `scores` (≤ 0), or None when off


def reward_inputs(batch: Rollout, rows: list[dict]) -> rewards.RewardInputs:
    return rewards.RewardInputs(prompts=batch.prompts, responses=batch.texts, rows=rows,
                                lengths=batch.mask.sum(dim=1).long().tolist(), truncated=(~batch.has_stop).tolist())


def score(sources: list[rewards.WeightedReward], batch: Rollout, rows: list[dict], args: PPOConfig, norm_mode: str,
          moments: rl.RunningMoments, accelerator) -> Scored:
    """Score a rollout with every reward source and shape the result for the objective.

    Order: each source's raw scores (checked) → a reward model with `reward_stats` standardised by them
    (norm_mode rm_stats) → Σ w_i · s_i → running standardisation (norm_mode running) → + the overlong penalty →
    − the missing-EOS penalty → clip. The penalties and the clip are in normalised units.
    rows: [B] the prompt row of each sample (its `answer` and other columns, for verifiable rewards).
    """
    inputs = reward_inputs(batch, rows)
    components = {key: value.to(accelerator.device) for key, value in rewards.score_components(sources, inputs).items()}
    raw = rewards.combine(sources, components, normalize_by_stats=False)
    total = rewards.combine(sources, components, normalize_by_stats=norm_mode == "rm_stats")
    mean = std = None
    if norm_mode == "running":
        moments.update(accelerator.gather(total))  # the same statistics on every process
        mean, std = moments.mean, moments.std
    total = rl.shape_scores(total, batch.has_stop, mean, std)  # standardise only; penalties below
    overlong = None
    if args.overlong_penalty:
        overlong = rewards.overlong_penalty(batch.mask.sum(dim=1), args.max_new_tokens, args.overlong_buffer_length,
                                            args.overlong_penalty_factor)
        total = total + overlong
    scores = rl.shape_scores(total, batch.has_stop, None, None, args.missing_eos_penalty, args.reward_clip)
    return Scored(raw=raw, scores=scores, components=components, overlong=overlong)


# ---------------------------------------------------------------------------------------------------------------
# held-out evaluation (--eval_dataset_path): the same reward sources on responses to prompts never trained on
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_policy(policy, tokenizer, rows: list[dict], sources: list[rewards.WeightedReward], args: PPOConfig,
                    stop_ids: list[int], suppressed: list[int], accelerator, temperature: float = 0.0,
                    seed: int = 0) -> list[dict]:
    """One response per held-out prompt row (greedy at temperature 0), scored by every reward source.

    Returns one record per row, in row order: {"id", "response", "truncated", "reward" (Σ w·raw), <key>: raw score
    of each source}. Each process answers rows[rank::P]; the records are gathered on every process.
    """
    from accelerate.utils import gather_object

    from rlhfkit.sampling import generate_batch

    mine = rows[accelerator.process_index::accelerator.num_processes]
    chunk = args.generation_batch_size or max(1, args.rollout_batch_size * args.num_samples_per_prompt)
    records = []
    for start in range(0, len(mine), chunk):
        part = mine[start : start + chunk]
        generated = generate_batch(policy, tokenizer, [row["prompt"] for row in part], n=1,
                                   max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=1.0, seed=seed,
                                   stop_ids=stop_ids, suppressed_tokens=suppressed)
        samples = [per_prompt[0] for per_prompt in generated]
        inputs = rewards.RewardInputs(
            prompts=[row["prompt"] for row in part], responses=[sample["text"] for sample in samples], rows=part,
            lengths=[len(sample["token_ids"]) for sample in samples],
            truncated=[not sample["finished"] for sample in samples])
        components = rewards.score_components(sources, inputs)
        total = rewards.combine(sources, components, normalize_by_stats=False)
        for index, (row, sample) in enumerate(zip(part, samples)):
            records.append({"id": row["id"], "response": sample["text"], "truncated": not sample["finished"],
                            "reward": float(total[index]),
                            **{key: float(values[index]) for key, values in components.items()}})
    if accelerator.num_processes > 1:
        records = gather_object(records)
    order = {row["id"]: index for index, row in enumerate(rows)}
    return sorted(records, key=lambda record: order[record["id"]])


def evaluation_summary(before: list[dict] | None, after: list[dict], keys: list[str], seed: int = 0) -> dict:
    """Mean of each key with a 95% percentile-bootstrap interval over prompts (10,000 resamples), before and after
    training, and the paired difference after − before (`rlhfkit.bootstrap`)."""
    from rlhfkit.bootstrap import bootstrap_mean_ci, paired_differences

    summary: dict[str, dict] = {}
    for key in keys:
        entry = {"after": bootstrap_mean_ci([r[key] for r in after], seed=seed).to_dict()}
        if before is not None:
            entry["before"] = bootstrap_mean_ci([r[key] for r in before], seed=seed).to_dict()
            delta = paired_differences({r["id"]: r[key] for r in after}, {r["id"]: r[key] for r in before})
            entry["delta"] = bootstrap_mean_ci(delta, seed=seed).to_dict()
        summary[key] = entry
    return summary


# ---------------------------------------------------------------------------------------------------------------
# dynamic sampling: more generation batches until enough prompt groups carry a signal
# ---------------------------------------------------------------------------------------------------------------
def draw_positions(step: int, draw: int, per_step: int, n_prompts: int, seed: int, used: set[int]) -> list[int]:
    """Prompt positions of generation batch `draw` of PPO step `step` (all processes).

    Draw 0 is the step's usual batch (`prompt_positions`). Further draws (dynamic sampling) take prompts not yet
    used in this step from a permutation seeded by (seed, step, draw), so a resumed run draws the same; a prompt
    set smaller than a few batches repeats prompts after exhausting the fresh ones.
    """
    if draw == 0:
        return prompt_positions(step, per_step, n_prompts, seed)
    from rlhfkit.sampling import derive_seed

    generator = torch.Generator().manual_seed(derive_seed(seed, "dynamic_sampling", step, draw))
    order = torch.randperm(n_prompts, generator=generator).tolist()
    fresh = [i for i in order if i not in used]
    while len(fresh) < per_step:
        fresh += order
    return fresh[:per_step]


def collect_rollouts(draw, args: PPOConfig, accelerator, pad_id: int):
    """This step's rollout: one generation batch, or with --dynamic_sampling as many as it takes (up to the cap)
    to gather --rollout_batch_size prompt groups whose K scores differ (`objectives.informative_groups`).

    draw(d) → (batch, rows, scored): generation batch d of this process, sampled and scored. Every process draws
    the same number of batches (the decision uses the gathered minimum), so collective calls stay in step.
    Returns (batch, rows, scored, metrics); with too few informative groups after the cap, the batch is filled
    with uninformative ones (zero advantage), as many as needed, and `sampling/filled_groups` says how many.
    """
    batch, rows, scored = draw(0)
    k = args.num_samples_per_prompt
    metrics: dict[str, torch.Tensor] = {}
    if args.estimator.min_samples_per_prompt >= 2:  # TRL's frac_reward_zero_std
        informative = objectives.informative_groups(scored.scores, k)
        metrics["sampling/zero_std_fraction"] = 1.0 - informative.float().mean()
    if not args.dynamic_sampling:
        return batch, rows, scored, metrics
    wanted = args.rollout_batch_size
    parts = [(batch, rows, scored, informative)]
    kept = int(informative.sum())
    draws = 1
    while draws < args.dynamic_sampling_max_batches:
        fewest = accelerator.gather(torch.tensor([kept], device=accelerator.device)).min().item()
        if fewest >= wanted:
            break
        batch, rows, scored = draw(draws)
        informative = objectives.informative_groups(scored.scores, k)
        parts.append((batch, rows, scored, informative))
        kept += int(informative.sum())
        draws += 1
    chosen = []  # (part, group): informative groups in draw order, then uninformative ones to fill
    for fill in (False, True):
        for index, (_, _, _, groups) in enumerate(parts):
            chosen += [(index, group) for group in range(groups.numel()) if bool(groups[group]) != fill]
    filled = max(0, wanted - kept)
    chosen = chosen[:wanted]
    row_index = [(part, group * k + j) for part, group in chosen for j in range(k)]
    batch = concat_rollouts([parts[part][0] for part in range(len(parts))], row_index, pad_id)
    rows = [parts[part][1][row] for part, row in row_index]
    scored = Scored(
        raw=torch.stack([parts[part][2].raw[row] for part, row in row_index]),
        scores=torch.stack([parts[part][2].scores[row] for part, row in row_index]),
        components={key: torch.stack([parts[part][2].components[key][row] for part, row in row_index])
                    for key in parts[0][2].components},
        overlong=None if parts[0][2].overlong is None else
        torch.stack([parts[part][2].overlong[row] for part, row in row_index]),
    )
    device = batch.responses.device
    metrics.update({
        "sampling/generation_batches": torch.tensor(float(draws), device=device),
        "sampling/prompts_sampled": torch.tensor(float(draws * args.rollout_batch_size), device=device),
        "sampling/informative_groups": torch.tensor(float(kept), device=device),
        "sampling/filled_groups": torch.tensor(float(filled), device=device),
    })
    return batch, rows, scored, metrics


def concat_rollouts(batches: list[Rollout], row_index: list[tuple[int, int]], pad_id: int) -> Rollout:
    """Rows `row_index` [(batch, row)] of several rollouts as one, re-padded: prompts on the left, responses on
    the right (the layout `rollout` makes), positions recomputed."""
    width = max(b.responses.shape[1] for b in batches)
    prompt_width = max(b.input_ids.shape[1] - b.responses.shape[1] for b in batches)

    def pad(tensor, left: int, right: int, value):
        return torch.nn.functional.pad(tensor, (left, right), value=value)

    parts = []
    for b in batches:
        prompt_len, response_len = b.input_ids.shape[1] - b.responses.shape[1], b.responses.shape[1]
        left, right = prompt_width - prompt_len, width - response_len
        parts.append({
            "input_ids": pad(b.input_ids, left, right, pad_id),
            "attention_mask": pad(b.attention_mask, left, right, 0),
            "responses": pad(b.responses, 0, right, pad_id),
            "mask": pad(b.mask, 0, right, 0.0),
            "sample_logprobs": pad(b.sample_logprobs, 0, right, 0.0),
        })

    def take(name):
        return torch.stack([parts[i][name][row] for i, row in row_index])

    attention_mask = take("attention_mask")
    return Rollout(
        prompts=[batches[i].prompts[row] for i, row in row_index],
        texts=[batches[i].texts[row] for i, row in row_index],
        input_ids=take("input_ids"),
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        responses=take("responses"),
        mask=take("mask"),
        has_stop=torch.stack([batches[i].has_stop[row] for i, row in row_index]),
        sample_logprobs=take("sample_logprobs"),
    )


@torch.no_grad()
def reward_metrics(scored: Scored, has_stop: torch.Tensor) -> dict:
    """Per-process means of each reward source's raw scores (reward/<key>) and of the overlong penalty."""
    metrics = {f"reward/{key}": values.float().mean() for key, values in scored.components.items()}
    if scored.overlong is not None:
        metrics["reward/overlong"] = scored.overlong.mean()
        metrics["reward/overlong_fraction"] = (scored.overlong < 0).float().mean()
    metrics["response/truncated_fraction"] = (~has_stop).float().mean()
    return metrics


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


# ---------------------------------------------------------------------------------------------------------------
# update
# ---------------------------------------------------------------------------------------------------------------
def ppo_update(model, optimizer, scheduler, accelerator, args: PPOConfig, batch: Rollout, old_logprobs,
               ref_logprobs, advantages, old_values, returns) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout in shuffled minibatches; returns the means of the loss metrics.

    Dropout off (`dropout_free`): the rollout's log-probs came from the same deterministic forward, so the first
    minibatch's ratio is 1 (`policy/first_ratio`, `policy/first_approx_kl` record it: a check of on-policyness).
    """
    dropout_free(model)
    total = batch.responses.shape[0]
    micro = args.per_device_train_batch_size
    accumulation = args.gradient_accumulation_steps
    width = batch.responses.shape[1]
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
                logits, values = model(
                    batch.input_ids[rows], batch.attention_mask[rows], batch.position_ids[rows], width, args.temperature
                )
                logprobs = rl.logprobs_from_logits(logits, batch.responses[rows])
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
                entropy = rl.masked_mean(rl.entropy_from_logits(logits), mask)
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
            del logits, values, logprobs, loss
    return {**{key: value / max(count, 1) for key, value in sums.items()}, **(first if count else {})}


def dropout_free(model: nn.Module) -> nn.Module:
    """Eval mode (no dropout: LoRA's, attention's, hidden), except the flag gradient checkpointing reads.

    transformers checkpoints a decoder layer only when that layer is `training`; setting the flag on those layers
    alone keeps checkpointing on while every dropout module and attention's `dropout_p` see eval mode.
    """
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True
    return model


# ---------------------------------------------------------------------------------------------------------------
# bookkeeping: prompt order, checkpoints, saving
# ---------------------------------------------------------------------------------------------------------------
def rollout_seeds(seed: int, step: int, positions: list[int]) -> list[int]:
    """One sampling seed per prompt of a step, from (seed, step, prompt position): a resumed run draws the same."""
    from rlhfkit.sampling import derive_seed

    return [derive_seed(seed, "ppo", step, position) for position in positions]


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
