"""The policy objectives of the GRPO family as pure functions of tensors: importance weights (token or sequence
level), the clipped surrogate with asymmetric clipping, CISPO, the loss aggregations, and the sampling controls
that act on the loss (truncated completions masked out, zero-variance groups).

Shapes: `B` sequences of a micro-batch, `T` response tokens (padded); `mask` [B, T] is 1 on counted response tokens
(`rlhfkit.rl.estimators.response_mask`); advantages are [B, T] (a sequence's advantage broadcast over its tokens).

Where the peers differ, what we follow (read from the sources, not from their docs):
- TRL 1.16.0 `trl/trainer/grpo_trainer.py`, `GRPOTrainer._compute_loss` (huggingface/trl at d2b69d76, the
  installed 1.16.0 wheel read line by line): `loss_type` grpo | bnpo | dr_grpo | dapo | cispo,
  `importance_sampling_level` token | sequence, `epsilon` / `epsilon_high`, `mask_truncated_completions`, the KL
  term `beta · k3` added to the per-token loss before aggregation. `tests/test_ppo_trl_parity.py` feeds TRL's
  public `GRPOTrainer.compute_loss` and these functions the same log-probs and compares losses and gradients.
- verl `verl/trainer/ppo/core_algos.py` (volcengine/verl at b178a3cd): `agg_loss` (token-mean, seq-mean-token-mean,
  seq-mean-token-sum-norm), `compute_policy_loss_vanilla` (clip_ratio_low/high; also a dual clip we do not have),
  `compute_policy_loss_gspo`, `compute_policy_loss_cispo`.

Aggregation (`--loss_aggregation`; TRL `loss_type` / verl `loss_agg_mode` in brackets):
- `token` [dapo / token-mean]: Σ over every counted token of the optimizer minibatch (all accumulation steps, all
  processes) ÷ the number of those tokens. DAPO, Yu et al. 2025, https://arxiv.org/abs/2503.14476, eq. (8).
- `sequence` [grpo / seq-mean-token-mean]: each sequence's token mean, then the mean over sequences. GRPO, Shao et
  al. 2024, https://arxiv.org/abs/2402.03300, eq. (3).
- `dr_grpo` [dr_grpo]: Σ over the micro-batch's tokens ÷ (B · max_completion_length), a constant: Dr. GRPO, Liu et
  al. 2025, https://arxiv.org/abs/2503.20783 (verl's seq-mean-token-sum-norm divides by T instead; we follow TRL).
- `bnpo` [bnpo]: Σ over the micro-batch's tokens ÷ their number (the micro-batch's own token mean; the same as
  `token` when gradient_accumulation_steps is 1 on one process). Xiao et al. 2025, https://arxiv.org/abs/2506.02864.

Importance weights (`--importance_sampling_level`): `token` ρ_t = π(y_t)/π_old(y_t); `sequence` (GSPO, Zheng et al.
2025, https://arxiv.org/abs/2507.18071) s = exp(mean_t log ρ_t), one weight per sequence ([B, 1]), as TRL computes
it. verl's "GSPO-token" form sg[s]·π/sg[π] has the same value and, with sequence-level advantages and `sequence`
aggregation, the same gradient.

CISPO (MiniMax-M1, https://arxiv.org/abs/2506.13585): loss_t = −sg(clip(w_t, 1 − ε_low, 1 + ε_high)) · A_t · log π_t,
as verl writes it (and the paper). TRL clips only from above, at `epsilon_high` as an absolute cap: that is
`--cliprange_low 1 --cliprange_high <cap − 1>` here (the lower bound 0 never binds), so both are reachable without a
flag. TRL aggregates CISPO like dapo; here it follows `--loss_aggregation`.
"""

from __future__ import annotations

import torch

from rlhfkit.rl.estimators import masked_mean

POLICY_LOSSES = ("ppo", "cispo")
LOSS_AGGREGATIONS = ("token", "sequence", "dr_grpo", "bnpo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def importance_log_weights(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                           level: str = "token") -> torch.Tensor:
    """log of the importance weights: `token` → log ρ_t [B, T]; `sequence` (GSPO) → mean_t log ρ_t [B, 1].

    logprobs (with grad), old_logprobs, mask: [B, T]. The sequence mean is over counted tokens (a row with none
    gets 0), as TRL's `(log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)`.
    """
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"unknown importance sampling level '{level}' (choose from {', '.join(IMPORTANCE_SAMPLING_LEVELS)})")


def clipped_surrogate(log_weights: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                      clip_high: float) -> torch.Tensor:
    """PPO's per-token loss with asymmetric clipping ("clip-higher", DAPO §3.1):

        loss_t = −min(w·A_t, clip(w, 1 − ε_low, 1 + ε_high)·A_t),   w = exp(log_weights)

    log_weights [B, T] or [B, 1] (broadcast), advantages [B, T] → [B, T].
    """
    weights = torch.exp(log_weights)
    clipped = torch.clamp(weights, 1.0 - clip_low, 1.0 + clip_high)
    return -torch.min(weights * advantages, clipped * advantages)


def cispo_loss(log_weights: torch.Tensor, logprobs: torch.Tensor, advantages: torch.Tensor, clip_low: float,
               clip_high: float) -> torch.Tensor:
    """CISPO's per-token loss: −sg(clip(w, 1 − ε_low, 1 + ε_high)) · A_t · log π_t ([B, T]).

    The weight is clipped and detached; the gradient flows through log π only, so no token's gradient is dropped
    (PPO's clip zeroes the gradient of clipped tokens).
    """
    weights = torch.clamp(torch.exp(log_weights), 1.0 - clip_low, 1.0 + clip_high).detach()
    return -weights * advantages * logprobs


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, mode: str, *,
                   max_completion_length: int | None = None, num_tokens: float | torch.Tensor | None = None
                   ) -> torch.Tensor:
    """One scalar from per-token losses [B, T] (the formulas are in the module docstring).

    `token`: ÷ `num_tokens`, the counted tokens of the whole optimizer minibatch as this micro-batch's share of the
    normaliser (the caller's business: see `token_normalizer`); default mask.sum() (then equal to `bnpo`).
    `dr_grpo` needs `max_completion_length` (L in B·L).
    """
    masked_sum = (per_token_loss * mask).sum()
    if mode == "token":
        normalizer = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=per_token_loss.dtype)
        return masked_sum / normalizer.clamp(min=1.0)
    if mode == "sequence":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if mode == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo aggregation needs max_completion_length (--max_new_tokens)")
        return masked_sum / (per_token_loss.shape[0] * max_completion_length)
    if mode == "bnpo":
        return masked_sum / mask.sum().clamp(min=1.0)
    raise ValueError(f"unknown loss aggregation '{mode}' (choose from {', '.join(LOSS_AGGREGATIONS)})")


def token_normalizer(window_tokens: float, accumulation_steps: int) -> float:
    """`num_tokens` for `token` aggregation so that the optimizer step sees Σ_tokens loss ÷ N over its minibatch.

    window_tokens: counted tokens of one accumulation window averaged over processes (N / P). accelerate divides
    each micro-batch's loss by the accumulation steps G and data parallelism averages over P processes, so each
    micro-batch must divide its token sum by N / (P·G) for the step to see Σ/N.
    """
    return window_tokens / accumulation_steps


def policy_objective(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, *, clip_low: float, clip_high: float, policy_loss: str = "ppo",
                     aggregation: str = "token", importance_sampling_level: str = "token",
                     ref_kl: torch.Tensor | None = None, kl_coef: float = 0.0, kl_importance_weighted: bool = False,
                     max_completion_length: int | None = None, num_tokens: float | torch.Tensor | None = None,
                     metrics_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss of one micro-batch and its metrics, as TRL's `_compute_loss` builds it:
    per-token surrogate (PPO-clip or CISPO) + kl_coef · ref_kl, aggregated by `aggregation`.

    logprobs (with grad), old_logprobs (rollout time), advantages, mask, ref_kl (per-token KL to the reference,
    with grad, e.g. k3; optional): [B, T]. kl_importance_weighted: the KL term times the importance weight w (with
    its gradient), TRL 1.16's default `use_bias_correction_kl=True` (DeepSeek-V3.2, arXiv 2512.02556: the unbiased
    reverse-KL gradient off-policy); False adds β·KL as verl's `kl_loss` does and TRL did before. Returns (loss, metrics); metrics are detached token means over `mask`:
    pg_loss (the surrogate alone, aggregated the same way), clipfrac (a clip is active), clipfrac_low (w < 1 − ε_low
    with A < 0), clipfrac_high (w > 1 + ε_high with A > 0), ratio (mean w), approx_kl (½ (log ρ_t)², per token).
    """
    log_weights = importance_log_weights(logprobs, old_logprobs, mask, importance_sampling_level)
    if policy_loss == "ppo":
        per_token = clipped_surrogate(log_weights, advantages, clip_low, clip_high)
    elif policy_loss == "cispo":
        per_token = cispo_loss(log_weights, logprobs, advantages, clip_low, clip_high)
    else:
        raise ValueError(f"unknown policy loss '{policy_loss}' (choose from {', '.join(POLICY_LOSSES)})")
    per_token = per_token.expand_as(mask) if per_token.shape != mask.shape else per_token
    kwargs = {"max_completion_length": max_completion_length, "num_tokens": num_tokens}
    pg_loss = aggregate_loss(per_token, mask, aggregation, **kwargs)
    loss = pg_loss
    if ref_kl is not None and kl_coef:
        kl_term = ref_kl * torch.exp(log_weights) if kl_importance_weighted else ref_kl
        loss = aggregate_loss(per_token + kl_coef * kl_term, mask, aggregation, **kwargs)
    with torch.no_grad():
        # metrics_mask: the tokens the diagnostics average over (default `mask`); the stage passes every response
        # token, so a micro-batch whose responses are all masked out of the loss still reports its ratio
        mask = mask if metrics_mask is None else metrics_mask
        weights = torch.exp(log_weights).expand_as(mask)
        low = (weights < 1.0 - clip_low) & (advantages < 0)
        high = (weights > 1.0 + clip_high) & (advantages > 0)
        log_ratio = logprobs - old_logprobs
        metrics = {
            "pg_loss": pg_loss.detach(),
            "clipfrac": masked_mean((low | high).float(), mask),
            "clipfrac_low": masked_mean(low.float(), mask),
            "clipfrac_high": masked_mean(high.float(), mask),
            "ratio": masked_mean(weights, mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# sampling controls
# ---------------------------------------------------------------------------------------------------------------
def mask_truncated(mask: torch.Tensor, has_stop: torch.Tensor) -> torch.Tensor:
    """`--mask_truncated_completions` (DAPO §3.4 "overlong filtering", TRL's flag of that name): responses cut at
    max_new_tokens (no stop token) leave the loss. mask [B, T], has_stop [B] → [B, T]."""
    return mask * has_stop.to(mask.dtype).unsqueeze(1)


def informative_groups(scores: torch.Tensor, group_size: int, atol: float = 0.0) -> torch.Tensor:
    """DAPO's dynamic sampling filter (§3.2; verl `recipe/dapo`: keep a prompt when the std of its group's scores is
    > 0): [B = N·K] prompt-major scores → [N] bool, True where the K scores are not all equal (within atol).

    A group whose samples all score the same has zero advantage under GRPO/RLOO and carries no policy gradient.
    """
    grouped = scores.float().view(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) > atol
