"""`PPOConfig`: every flag of ppo_train.py beyond the model and script arguments (the PPO, RLOO, GRPO and
REINFORCE++ knobs, rollouts, rewards shaping, evaluation), on top of transformers' `TrainingArguments`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from rlhfkit.rl import estimators as rl
from rlhfkit.rl.estimators import AdvantageEstimator



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
    pairwise_forward: str = field(
        default="auto",
        metadata={"help": "The log-prob forwards (old, reference, update) of critic-free runs: prefix_shared computes "
                  "each prompt once for its K samples and packs the responses without padding (exact, checked on "
                  "the loaded policy by auto); padded: every sample in its own padded row (also with a value "
                  "model, which always uses it). See rlhfkit/pairwise.py."},
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
        from rlhfkit.args import check_pairwise_forward

        check_pairwise_forward(self.pairwise_forward)
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

