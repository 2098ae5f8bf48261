"""The math of on-policy RLHF as pure functions of tensors: masks, KL estimators, per-token rewards, advantages
(GAE, RLOO, GRPO, REINFORCE++), the clipped PPO losses, and the KL-coefficient controllers.

Written here because no maintained library ships it any more as reusable functions (TRL removed PPOTrainer in
2026; its GRPO/RLOO trainers keep the math inside the trainer). `rlhfkit.rl.ppo` is the only caller; the tests in
`tests/test_rl.py` check every function against values computed by hand.

Shapes: `B` sequences in the rollout batch, `T` response tokens (padded). A response mask `[B, T]` is 1 on the
response tokens up to and including the first stop token (EOS) and 0 after it; it is always a prefix of ones,
which `last_token_index` relies on. With `K` samples per prompt the batch is prompt-major: rows `i*K .. i*K+K-1`
hold the samples of prompt `i` (the order `generate(num_return_sequences=K)` returns).

References:
- PPO: Schulman et al. 2017, https://arxiv.org/abs/1707.06347 (clipped surrogate)
- GAE: Schulman et al. 2015, https://arxiv.org/abs/1506.02438
- RLHF with a per-token KL penalty and adaptive KL: Ziegler et al. 2019, https://arxiv.org/abs/1909.08593;
  InstructGPT, Ouyang et al. 2022, https://arxiv.org/abs/2203.02155 (value model initialised from the RM)
- KL estimators k1/k2/k3: J. Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html
- RLOO: Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740
- GRPO: Shao et al. 2024 (DeepSeekMath), https://arxiv.org/abs/2402.03300
- REINFORCE++: Hu 2025, https://arxiv.org/abs/2501.03262
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

KL_ESTIMATORS = ("k1", "k2", "k3")


class AdvantageEstimator(str, enum.Enum):  # enum.StrEnum needs Python 3.11; the package supports 3.10
    """The advantage estimators, with the facts the loop needs about each (what to load, how to sample)."""

    GAE = "gae"  # per-token rewards, a learned critic
    RLOO = "rloo"  # leave-one-out baseline over the K samples of a prompt
    GRPO = "grpo"  # group mean (and std) over the K samples of a prompt
    REINFORCE_PP = "reinforce_pp"  # discounted returns whitened over the batch

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, name: str | AdvantageEstimator) -> AdvantageEstimator:
        try:
            return cls(name)
        except ValueError:
            raise ValueError(
                f"unknown advantage estimator '{name}' (choose from {', '.join(ADVANTAGE_ESTIMATORS)})"
            ) from None

    @property
    def needs_critic(self) -> bool:
        """Whether a value model is loaded and trained."""
        return self is AdvantageEstimator.GAE

    @property
    def min_samples_per_prompt(self) -> int:
        """The group-based baselines need at least 2 samples of each prompt."""
        return 2 if self in (AdvantageEstimator.RLOO, AdvantageEstimator.GRPO) else 1

    @property
    def whitens_itself(self) -> bool:
        """REINFORCE++ normalises over the batch as part of the estimator; whitening again would be a no-op."""
        return self is AdvantageEstimator.REINFORCE_PP


ADVANTAGE_ESTIMATORS = tuple(estimator.value for estimator in AdvantageEstimator)


# ---------------------------------------------------------------------------------------------------------------
# masks and masked statistics
# ---------------------------------------------------------------------------------------------------------------
def response_mask(
    response_ids: torch.Tensor, stop_token_ids: Sequence[int], lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which response tokens count: everything up to and including the first stop token.

    response_ids: [B, T] generated ids, padded after the end (with any id: the pad id is a normal vocabulary
    entry a sampling policy can emit, so padding is never recognised by value).
    lengths: [B] how many tokens each row really generated (default T); tokens at or past it are padding.
    Returns (mask [B, T] float, has_stop [B] bool).
    """
    batch, length = response_ids.shape
    positions = torch.arange(length, device=response_ids.device).expand(batch, length)
    if lengths is None:
        lengths = torch.full((batch,), length, device=response_ids.device, dtype=torch.long)
    in_length = positions < lengths.unsqueeze(1)
    is_stop = torch.isin(response_ids, torch.tensor(list(stop_token_ids), device=response_ids.device)) & in_length
    has_stop = is_stop.any(dim=1)
    first_stop = torch.where(has_stop, is_stop.float().argmax(dim=1), lengths - 1)
    mask = (positions <= first_stop.unsqueeze(1)) & in_length
    return mask.float(), has_stop


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last counted token per row ([B, T] prefix mask → [B] long); -1 for an empty row."""
    return mask.long().sum(dim=1) - 1


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where mask == 1 (0 for an all-zero mask instead of NaN)."""
    return masked_sum(values, mask, dim) / (mask.sum() if dim is None else mask.sum(dim=dim)).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked positions (Bessel-corrected by default, as torch.var)."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    variance = masked_sum((values - mean) ** 2, mask) / count.clamp(min=1)
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked positions; masked-out positions come back as 0.

    shift_mean=False only rescales: used for rewards, whose sign carries meaning.
    """
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ---------------------------------------------------------------------------------------------------------------
# log-probabilities, entropy, KL
# ---------------------------------------------------------------------------------------------------------------
def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position: logits [B, T, V], labels [B, T] → [B, T]."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax per position: [B, T, V] → [B, T] (logsumexp − Σ p·logit, stable for large logits)."""
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π: [B, T] → [B, T].

    k1 = log π − log π_ref (unbiased, can be negative, high variance);
    k2 = ½ (log π − log π_ref)² (biased, ≥ 0); k3 = (r − 1) − log r with r = π_ref/π (unbiased, ≥ 0).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # clamp: one token with π_ref ≪ π would give exp(large) and a NaN gradient; ±20 nats is far outside use
        neg = (-log_ratio).clamp(min=-20.0, max=20.0)
        return torch.exp(neg) - 1.0 - neg
    raise ValueError(f"unknown KL estimator '{estimator}' (choose from {', '.join(KL_ESTIMATORS)})")


# ---------------------------------------------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------------------------------------------
def shape_scores(
    raw_scores: torch.Tensor,
    has_stop: torch.Tensor,
    mean: float | None = None,
    std: float | None = None,
    missing_eos_penalty: float | None = None,
    clip: float | None = None,
) -> torch.Tensor:
    """Sequence scores as the RL objective sees them: normalise, penalise truncation, clip ([B] → [B]).

    Order matters: the penalty and the clip are in normalised units, so one setting works across reward models.
    A response without a stop token was cut at max_new_tokens; the RM cannot tell (re-rendering closes the turn),
    so `missing_eos_penalty` is how truncation is discouraged.
    """
    scores = raw_scores.float()
    if mean is not None and std is not None:
        scores = (scores - mean) / max(std, 1e-8)
    if missing_eos_penalty:
        scores = scores - missing_eos_penalty * (~has_stop).float()
    if clip is not None:
        scores = scores.clamp(min=-clip, max=clip)
    return scores


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: −β·KL on every response token, plus the sequence score on the last response token.

    scores [B], kl [B, T], mask [B, T] → (rewards [B, T], kl_rewards [B, T]).
    The last response token is the stop token when one was generated, else the last generated token; never the
    position after it (a classic off-by-one: the score would then sit on padding and be masked away).
    """
    kl_rewards = -kl_coef * kl * mask
    rewards = kl_rewards.clone()
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    has_tokens = last >= 0
    rewards[rows[has_tokens], last[has_tokens]] += scores[has_tokens].to(rewards.dtype)
    return rewards, kl_rewards


def kl_penalized_scores(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Sequence-level reward for the critic-free estimators: score − β·Σ_t KL_t ([B], [B, T], [B, T] → [B])."""
    return scores - kl_coef * masked_sum(kl, mask, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------------------------
def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    rewards, values, mask: [B, T] → (advantages [B, T], returns [B, T]), both 0 where mask == 0.
    δ_t = r_t + γ·V_{t+1} − V_t with V = 0 past the last token (the episode ends there), A_t = δ_t + γλ·A_{t+1},
    returns = A + V (the value-function targets).
    """
    values = values * mask
    rewards = rewards * mask
    length = rewards.shape[1]
    advantages_reversed = []
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        # masked positions lie after the last token, so zeroing keeps them from leaking into earlier steps
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages_reversed.append(running)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = (advantages + values) * mask
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = Σ_{s≥t} γ^{s−t} r_s over the response ([B, T] → [B, T], 0 where mask == 0)."""
    rewards = rewards * mask
    running = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out.append(running)
    return torch.stack(out[::-1], dim=1)


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(f"group-based advantages need at least 2 samples per prompt, got {group_size}")
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    return scores.float().view(-1, group_size)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out: each sample's baseline is the mean reward of the other K−1 samples of its prompt.

    rewards [B = N·K] (prompt-major) → advantages [B].
    """
    grouped = _groups(rewards, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (r − mean of the prompt's group) / (std of the group + eps), std Bessel-corrected ([B] → [B]).

    scale=False keeps only the centring (Dr. GRPO's fix for the std's bias toward easy/hard prompts).
    """
    grouped = _groups(rewards, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++: discounted return of the per-token rewards (KL penalty included), whitened over the batch.

    rewards, mask [B, T] → advantages [B, T]. The batch-wide normalisation replaces the critic's baseline.
    """
    return masked_whiten(discounted_returns(rewards, mask, gamma), mask)


def broadcast_to_tokens(sequence_advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] → [B, T]: every counted token of a response gets its sequence's advantage."""
    return sequence_advantages.unsqueeze(1).to(mask.dtype) * mask


def compute_advantages(
    estimator: str | AdvantageEstimator,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    kl_coef: float,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    group_size: int = 1,
    whiten_rewards: bool = False,
    whiten_advantages: bool = True,
    grpo_scale_by_std: bool = True,
    step_rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Advantages [B, T] and value targets [B, T] (None without a critic) for one estimator.

    scores [B] (shaped sequence scores), kl [B, T] (per-token KL, already masked), mask [B, T], values [B, T]
    (the critic's, GAE only). step_rewards [B, T] (a process reward model's per-step rewards at step ends,
    rlhfkit/rl/model_rewards.py): added to the per-token rewards of GAE and REINFORCE++; refused by the
    sequence-level estimators, which take the aggregate in `scores`. An unknown estimator raises.
    """
    estimator = AdvantageEstimator.parse(estimator)
    returns = None
    if step_rewards is not None and estimator not in (AdvantageEstimator.GAE, AdvantageEstimator.REINFORCE_PP):
        raise ValueError(f"per-step rewards need a per-token estimator (gae, reinforce_pp), not '{estimator}'")
    if estimator is AdvantageEstimator.GAE:
        if values is None:
            raise ValueError("GAE needs the value model's values")
        rewards, _ = token_rewards(scores, kl, mask, kl_coef)
        if step_rewards is not None:
            rewards = rewards + step_rewards * mask
        if whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    elif estimator is AdvantageEstimator.REINFORCE_PP:
        rewards, _ = token_rewards(scores, kl, mask, kl_coef)
        if step_rewards is not None:
            rewards = rewards + step_rewards * mask
        advantages = reinforce_pp_advantages(rewards, mask, gamma)
    elif estimator is AdvantageEstimator.RLOO:
        advantages = broadcast_to_tokens(rloo_advantages(kl_penalized_scores(scores, kl, mask, kl_coef), group_size), mask)
    elif estimator is AdvantageEstimator.GRPO:
        per_sequence = grpo_advantages(kl_penalized_scores(scores, kl, mask, kl_coef), group_size, scale=grpo_scale_by_std)
        advantages = broadcast_to_tokens(per_sequence, mask)
    else:  # unreachable while every member has a branch; kept so a new member cannot fall through silently
        raise ValueError(f"advantage estimator '{estimator}' has no implementation")
    if whiten_advantages and not estimator.whitens_itself:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------------------------
def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate averaged over all counted tokens: `rlhfkit.rl.objectives.policy_objective` with a
    symmetric clip, token ratios and token aggregation over this batch (the family's other objectives live there).

    logprobs (current policy, with grad), old_logprobs (at rollout time), advantages, mask: [B, T].
    loss = mean_t max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(log π − log π_old).
    """
    from rlhfkit.rl.objectives import policy_objective  # objectives builds on this module's masked statistics

    loss, metrics = policy_objective(logprobs, old_logprobs, advantages, mask, clip_low=clip_range,
                                     clip_high=clip_range)
    return loss, metrics


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ½·mean_t max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²); ε=None: plain ½·MSE.

    values (with grad), old_values (rollout time), returns (GAE targets), mask: [B, T].
    """
    unclipped = (values - returns) ** 2
    if clip_range is None:
        loss = 0.5 * masked_mean(unclipped, mask)
        return loss, {"vf_clipfrac": torch.zeros((), device=values.device)}
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(R − V) / Var(R) over counted tokens: 1 is a perfect critic, 0 no better than a constant."""
    var_returns = masked_var(returns, mask)
    if var_returns <= 0:
        return torch.zeros((), device=values.device)
    return 1.0 - masked_var(returns - values, mask) / var_returns


# ---------------------------------------------------------------------------------------------------------------
# stateful helpers (saved in checkpoints through state_dict / load_state_dict)
# ---------------------------------------------------------------------------------------------------------------
class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon).

    `current_kl` is the mean per-sequence KL (summed over tokens) of the latest rollout, `n_steps` the number of
    sequences it held, `horizon` how many sequences it takes to correct a proportional error.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL needs target > 0 and horizon > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])


class RunningMoments:
    """Mean and std of every value seen so far (Chan et al.'s parallel update), for `--reward_normalization running`."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_var = values.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
