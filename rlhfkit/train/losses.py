"""Losses as pure functions of tensors, each returning the loss and the metrics computed from the same tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry pairwise loss for reward models.

    loss = mean_i[ -log σ(r_c,i − r_r,i − m_i) ] + center_coefficient · mean_i[ (r_c,i + r_r,i)² ]

    - Bradley & Terry (1952); InstructGPT (Ouyang et al. 2022) for RMs. The optional per-pair `margin` m_i follows
      Llama 2 (Touvron et al. 2023): the chosen reward must exceed the rejected one by m_i before the loss flattens.
    - Reward centering (Eisenstein et al. 2023, "Helping or Herding?") keeps rewards near zero, since BT is
      invariant to a shared offset; TRL's `center_rewards_coefficient` uses the same term.

    Args:
        chosen_rewards: [B] scalar rewards of the preferred responses.
        rejected_rewards: [B] scalar rewards of the dispreferred responses.
        margin: [B] or None.
        center_coefficient: weight of the centering term (0 disables it).

    Returns:
        loss: [] scalar.
        metrics: detached [] scalars: accuracy (strict >, ties count as wrong, as in RewardBench), margin_mean
        (mean r_c − r_r), reward_mean and reward_std over all 2B rewards, chosen_mean, rejected_mean.
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(f"chosen_rewards and rejected_rewards must both be [B]; got {tuple(chosen_rewards.shape)} "
                         f"and {tuple(rejected_rewards.shape)}")
    diff = chosen_rewards - rejected_rewards
    logits = diff - margin.to(diff.dtype) if margin is not None else diff
    loss = -F.logsigmoid(logits).mean()
    if center_coefficient:
        loss = loss + center_coefficient * torch.mean((chosen_rewards + rejected_rewards) ** 2)
    with torch.no_grad():
        both = torch.cat([chosen_rewards, rejected_rewards]).float()
        metrics = {
            "accuracy": (diff > 0).float().mean(),
            "margin_mean": diff.float().mean(),
            "reward_mean": both.mean(),
            "reward_std": both.std(unbiased=False),
            "chosen_mean": chosen_rewards.float().mean(),
            "rejected_mean": rejected_rewards.float().mean(),
        }
    return loss, metrics
