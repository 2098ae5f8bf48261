"""DPO's loss types as pure functions of per-pair log-probs, and the metrics TRL logs, from the same tensors.

Every `loss_type` of TRL 1.16's `DPOTrainer` (huggingface/trl v1.16.0, `trl/trainer/dpo_trainer.py`, the loop
over `loss_types` in its private `_compute_loss`: read, never called), with its options: `beta`,
`label_smoothing` (robust, exo_pair, aot), `discopop_tau`, `f_divergence_type` / `f_alpha_divergence_coef`
(f-DPO), `ld_alpha` (LD-DPO), `use_weighting` (WPO) and several types at once with `loss_weights`. TRL's
`DPOConfig` carries the flags; this module only reads its public fields (`DPOLossConfig.from_args`).
tests/test_dpo_losses.py checks every type and option against TRL's own `DPOTrainer.compute_loss` on the same
model and batch.

Shapes: B pairs; the per-token tensors of a batch are [2B, T] with the chosen rows first, then the rejected rows
(TRL's order), T the longest completion; `mask` marks the scored completion tokens (1) against padding (0).
Conventions follow open-instruct's `open_instruct/dpo_utils.py` (a `DPOLossType` enum whose members know what they
need; a dispatch that ends in `raise ValueError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class DPOLossType(str, Enum):
    """TRL 1.16's `loss_type` values; each member knows which inputs its loss reads."""

    sigmoid = "sigmoid"  # DPO (Rafailov et al. 2023, arXiv 2305.18290)
    hinge = "hinge"  # SLiC (arXiv 2305.10425)
    ipo = "ipo"  # IPO (arXiv 2310.12036), per-token averaged as TRL does
    exo_pair = "exo_pair"  # EXO (arXiv 2402.00856), eq. 16
    nca_pair = "nca_pair"  # NCA (arXiv 2402.05369)
    robust = "robust"  # robust DPO (arXiv 2403.00409)
    bco_pair = "bco_pair"  # BCO, paired (arXiv 2404.04656)
    sppo_hard = "sppo_hard"  # SPPO with hard labels (arXiv 2405.00675)
    aot = "aot"  # AOT, paired (arXiv 2406.05882)
    aot_unpaired = "aot_unpaired"  # AOT, unpaired
    apo_zero = "apo_zero"  # APO-zero (arXiv 2408.06266), eq. 7
    apo_down = "apo_down"  # APO-down, eq. 8
    discopop = "discopop"  # DiscoPOP (arXiv 2406.08414), eq. 5
    sft = "sft"  # NLL of the chosen tokens (MPO / RPO combine it with a preference loss)
    sigmoid_norm = "sigmoid_norm"  # DPO on per-token averaged scores

    @property
    def needs_reference_model(self) -> bool:
        """Its loss reads reference log-probs (the logged rewards always do)."""
        return self is not DPOLossType.sft

    @property
    def needs_lengths(self) -> bool:
        """Its loss divides by each completion's token count."""
        return self in (DPOLossType.ipo, DPOLossType.sigmoid_norm)

    @property
    def needs_token_logps(self) -> bool:
        """Its loss reads the chosen per-token log-probs, not only their sums."""
        return self is DPOLossType.sft

    @property
    def uses_label_smoothing(self) -> bool:
        return self in (DPOLossType.robust, DPOLossType.exo_pair, DPOLossType.aot, DPOLossType.aot_unpaired)

    @property
    def supports_f_divergence(self) -> bool:
        """Built on the chosen − rejected score difference, where f-DPO's β·log Z(x) cancels (TRL's rule)."""
        return self in (DPOLossType.sigmoid, DPOLossType.sigmoid_norm, DPOLossType.hinge, DPOLossType.ipo,
                        DPOLossType.exo_pair, DPOLossType.robust, DPOLossType.discopop, DPOLossType.sft)

    @property
    def couples_pairs(self) -> bool:
        """One pair's loss depends on the other pairs of the batch (AOT sorts the batch; SFT averages its tokens),
        so splitting a batch into micro-batches changes the loss."""
        return self in (DPOLossType.aot, DPOLossType.aot_unpaired, DPOLossType.sft)


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class DPOLossConfig:
    """The loss options of TRL's `DPOConfig`, validated as TRL's `DPOTrainer.__init__` validates them."""

    loss_types: tuple[DPOLossType, ...] = (DPOLossType.sigmoid,)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: float | None = None
    use_weighting: bool = False

    def __post_init__(self):
        known = [t.value for t in DPOLossType]
        unknown = [t for t in self.loss_types if t not in known]
        if unknown:
            raise ValueError(f"Unknown loss type: {', '.join(map(str, unknown))}; one of {', '.join(known)}")
        types = tuple(DPOLossType(t) for t in self.loss_types)
        object.__setattr__(self, "loss_types", types)
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"--loss_weights has {len(self.loss_weights)} values for {len(types)} --loss_type "
                             "values; give one weight per loss type")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"Unknown f_divergence_type: {self.f_divergence_type}; one of {', '.join(F_DIVERGENCES)}")
        if self.f_divergence_type != "reverse_kl":
            unsupported = [t.value for t in types if not t.supports_f_divergence]
            if unsupported:
                raise ValueError(f"--f_divergence_type {self.f_divergence_type} is only defined for "
                                 f"{[t.value for t in DPOLossType if t.supports_f_divergence]}, not {unsupported}")
        if self.use_weighting and any(t in (DPOLossType.aot, DPOLossType.aot_unpaired) for t in types):
            raise ValueError("--use_weighting (WPO) does not apply to aot/aot_unpaired: they sort the batch, which "
                             "would misalign the per-pair weights")
        if DPOLossType.exo_pair in types and self.label_smoothing == 0.0:
            raise ValueError("--loss_type exo_pair needs --label_smoothing > 0 (the EXO paper uses 1e-3)")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"--ld_alpha {self.ld_alpha}: must lie in [0, 1]")

    @classmethod
    def from_args(cls, args) -> "DPOLossConfig":
        """From a TRL `DPOConfig` (its public, documented fields)."""
        weights = None if args.loss_weights is None else tuple(float(w) for w in args.loss_weights)
        return cls(loss_types=tuple(args.loss_type), loss_weights=weights, beta=args.beta,
                   label_smoothing=args.label_smoothing, discopop_tau=args.discopop_tau,
                   f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
                   ld_alpha=args.ld_alpha, use_weighting=args.use_weighting)

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_types)

    @property
    def needs_lengths(self) -> bool:
        return any(t.needs_lengths for t in self.loss_types)

    @property
    def needs_token_logps(self) -> bool:
        return self.use_weighting or any(t.needs_token_logps for t in self.loss_types)

    @property
    def couples_pairs(self) -> bool:
        return any(t.couples_pairs for t in self.loss_types)


@dataclass
class DPOBatch:
    """What the losses read for B pairs. [B] unless noted; the optional fields are needed only by some types."""

    chosen_logps: Tensor  # Σ log π(y_w|x) over the completion (LD-DPO-weighted when ld_alpha is set), with grad
    rejected_logps: Tensor
    ref_chosen_logps: Tensor  # the same under the reference model, no grad
    ref_rejected_logps: Tensor
    chosen_lengths: Tensor | None = None  # completion tokens (ipo, sigmoid_norm)
    rejected_lengths: Tensor | None = None
    chosen_token_logps: Tensor | None = None  # [B, T] per-token log π of the chosen completions (sft), 0 off mask
    chosen_mask: Tensor | None = None  # [B, T]
    pair_weights: Tensor | None = None  # WPO weights (`wpo_weights`), no grad


# ---------------------------------------------------------------------------------------------------------------
# from per-token log-probs to what the losses read
# ---------------------------------------------------------------------------------------------------------------
def sequence_logps(token_logps: Tensor, mask: Tensor, ld_alpha: float | None = None) -> Tensor:
    """[2B, T] per-token log-probs (0 off mask) and mask → [2B] sums over each completion.

    With `ld_alpha` (LD-DPO, arXiv 2409.06411) tokens past the shorter completion of the pair count ld_alpha times:
    Σ_{k ≤ min(len_w, len_l)} + ld_alpha · Σ_{k > min(...)}, as TRL's loss and `compute_ref_log_probs` do.
    """
    if ld_alpha is None:
        return (token_logps * mask).sum(dim=1)
    position = mask.cumsum(dim=1)  # 1-based index among the completion tokens
    chosen_lengths, rejected_lengths = mask.sum(dim=1).chunk(2)
    shared = torch.minimum(chosen_lengths, rejected_lengths).repeat(2).unsqueeze(1)
    shared_mask = (position > 0) & (position <= shared) & mask.bool()
    tail_mask = (position > shared) & mask.bool()
    return (token_logps * shared_mask).sum(dim=1) + ld_alpha * (token_logps * tail_mask).sum(dim=1)


def wpo_weights(token_logps: Tensor, log_sum_sq_probs: Tensor, mask: Tensor) -> Tensor:
    """WPO's pair weight (arXiv 2406.11827, eq. 2), TRL's form: w(y) = exp(mean_k [log π(y_k) − log Σ_v π(v)²]) per
    completion, w_pair = w(y_w) · w(y_l). [2B, T] per-token log-probs, log Σ_v π(v|·)², mask → [B], no grad.
    """
    with torch.no_grad():
        lengths = mask.sum(dim=1).clamp_min(1)
        aligned = ((token_logps - log_sum_sq_probs) * mask).sum(dim=1) / lengths
        chosen, rejected = aligned.exp().chunk(2)
        return chosen * rejected


def f_divergence_scores(logratios: Tensor, f_divergence_type: str, alpha: float = 0.5) -> Tensor:
    """f-DPO (arXiv 2309.16240): the score f'(π/π_ref) of each completion from log(π/π_ref); reverse KL gives the
    log-ratio itself (standard DPO). [B] → [B]."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":  # f'(t) = 1 − 1/t
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":  # f'(t) = (t^(α−1) − 1) / (α − 1); α → 1 is reverse KL
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        exponent = (alpha - 1.0) * logratios
        # exp() clamped so it stays finite once cast back (TRL's bounds per dtype)
        limit = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}[exponent.dtype]
        return (torch.exp(exponent.float().clamp(max=limit)) - 1.0).to(exponent.dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"Unknown f_divergence_type: {f_divergence_type}")


# ---------------------------------------------------------------------------------------------------------------
# the loss types: each returns per-pair losses [B] (sft: its batch scalar repeated B times)
# ---------------------------------------------------------------------------------------------------------------
def sigmoid_loss(delta: Tensor, beta: float) -> Tensor:
    """−log σ(β·Δ), Δ = chosen score − rejected score."""
    return -F.logsigmoid(beta * delta)


def hinge_loss(delta: Tensor, beta: float) -> Tensor:
    """max(0, 1 − β·Δ)."""
    return torch.relu(1 - beta * delta)


def ipo_loss(chosen_scores: Tensor, rejected_scores: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
             beta: float) -> Tensor:
    """(Δ̄ − 1/(2β))², Δ̄ the difference of per-token averaged scores (IPO eq. 17, β is the paper's τ). TRL averages
    per token, a normalisation it agreed with the IPO authors."""
    delta = chosen_scores / chosen_lengths.clamp(min=1) - rejected_scores / rejected_lengths.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def exo_pair_loss(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """KL(q_θ ‖ p) over {chosen, rejected}, q_θ = softmax of β·scores, p = (1 − ε, ε) (EXO eq. 16)."""
    q_chosen, log_q_chosen = torch.sigmoid(beta * delta), F.logsigmoid(beta * delta)
    q_rejected, log_q_rejected = torch.sigmoid(-beta * delta), F.logsigmoid(-beta * delta)
    return (q_chosen * (log_q_chosen - math.log1p(-label_smoothing))
            + q_rejected * (log_q_rejected - math.log(label_smoothing)))


def nca_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """−log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l), r = β·log(π/π_ref)."""
    chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def robust_loss(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Unbiased DPO under labels flipped with probability ε: [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)."""
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
    flipped = -label_smoothing * F.logsigmoid(-beta * delta)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def bco_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """−log σ(r_w) − log σ(−r_l)."""
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


def sppo_hard_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """(log-ratio_w − 1/(2β))² + (log-ratio_l + 1/(2β))²: SPPO with P(winner) = 1, P(loser) = 0."""
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def _smoothed_sigmoid(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def aot_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             beta: float, label_smoothing: float) -> Tensor:
    """AOT paired: the policy's and the reference's chosen − rejected log-ratios, each sorted over the batch, then
    the smoothed sigmoid loss of their difference (pair i of the result is the i-th order statistic)."""
    policy, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
    reference, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
    return _smoothed_sigmoid(policy - reference, beta, label_smoothing)


def aot_unpaired_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float,
                      label_smoothing: float) -> Tensor:
    """AOT unpaired: chosen and rejected log-ratios sorted separately over the batch, then the smoothed sigmoid."""
    chosen, _ = torch.sort(chosen_logratios, dim=0)
    rejected, _ = torch.sort(rejected_logratios, dim=0)
    return _smoothed_sigmoid(chosen - rejected, beta, label_smoothing)


def apo_zero_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """1 − σ(r_w) + σ(r_l): chosen up, rejected down (for chosen better than the model's own outputs)."""
    return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """σ(r_w) + 1 − σ(r_w − r_l): both down, rejected more (for chosen worse than the model's own outputs)."""
    return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))


def discopop_loss(delta: Tensor, beta: float, tau: float) -> Tensor:
    """Log-ratio modulated loss: logistic and exponential terms mixed by σ(βΔ/τ)."""
    logits = beta * delta
    mix = torch.sigmoid(logits / tau)
    return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix


def sft_loss(chosen_token_logps: Tensor, chosen_mask: Tensor) -> Tensor:
    """Mean NLL over all chosen completion tokens of the batch (a token mean, not a mean of per-pair means).
    [B, T], [B, T] → [B], the scalar repeated so it combines with the per-pair losses like TRL's."""
    nll = -chosen_token_logps[chosen_mask.bool()].mean()
    return nll.expand(chosen_token_logps.shape[0])


def sigmoid_norm_loss(chosen_scores: Tensor, rejected_scores: Tensor, chosen_lengths: Tensor,
                      rejected_lengths: Tensor, beta: float) -> Tensor:
    """−log σ(β·Δ̄), Δ̄ the difference of per-token averaged scores."""
    delta = chosen_scores / chosen_lengths.clamp(min=1) - rejected_scores / rejected_lengths.clamp(min=1)
    return -F.logsigmoid(beta * delta)


def _required(value: Tensor | None, loss_type: DPOLossType, name: str) -> Tensor:
    if value is None:
        raise ValueError(f"loss type {loss_type.value} needs DPOBatch.{name}")
    return value


def per_pair_loss(loss_type: DPOLossType | str, config: DPOLossConfig, batch: DPOBatch) -> Tensor:
    """One loss type's per-pair losses [B] (before WPO weighting and the mean)."""
    loss_type = DPOLossType(loss_type)
    beta = config.beta
    chosen_logratios = batch.chosen_logps - batch.ref_chosen_logps
    rejected_logratios = batch.rejected_logps - batch.ref_rejected_logps
    chosen_scores = f_divergence_scores(chosen_logratios, config.f_divergence_type, config.f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, config.f_divergence_type,
                                          config.f_alpha_divergence_coef)
    delta = chosen_scores - rejected_scores
    if loss_type is DPOLossType.sigmoid:
        return sigmoid_loss(delta, beta)
    if loss_type is DPOLossType.hinge:
        return hinge_loss(delta, beta)
    if loss_type is DPOLossType.ipo:
        return ipo_loss(chosen_scores, rejected_scores, _required(batch.chosen_lengths, loss_type, "chosen_lengths"),
                        _required(batch.rejected_lengths, loss_type, "rejected_lengths"), beta)
    if loss_type is DPOLossType.exo_pair:
        return exo_pair_loss(delta, beta, config.label_smoothing)
    if loss_type is DPOLossType.nca_pair:
        return nca_pair_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type is DPOLossType.robust:
        return robust_loss(delta, beta, config.label_smoothing)
    if loss_type is DPOLossType.bco_pair:
        return bco_pair_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type is DPOLossType.sppo_hard:
        return sppo_hard_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type is DPOLossType.aot:
        return aot_loss(batch.chosen_logps, batch.rejected_logps, batch.ref_chosen_logps, batch.ref_rejected_logps,
                        beta, config.label_smoothing)
    if loss_type is DPOLossType.aot_unpaired:
        return aot_unpaired_loss(chosen_logratios, rejected_logratios, beta, config.label_smoothing)
    if loss_type is DPOLossType.apo_zero:
        return apo_zero_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type is DPOLossType.apo_down:
        return apo_down_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type is DPOLossType.discopop:
        return discopop_loss(delta, beta, config.discopop_tau)
    if loss_type is DPOLossType.sft:
        return sft_loss(_required(batch.chosen_token_logps, loss_type, "chosen_token_logps"),
                        _required(batch.chosen_mask, loss_type, "chosen_mask"))
    if loss_type is DPOLossType.sigmoid_norm:
        return sigmoid_norm_loss(chosen_scores, rejected_scores,
                                 _required(batch.chosen_lengths, loss_type, "chosen_lengths"),
                                 _required(batch.rejected_lengths, loss_type, "rejected_lengths"), beta)
    raise ValueError(f"Unknown loss type: {loss_type}")


def dpo_loss(config: DPOLossConfig, batch: DPOBatch) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ_types weight · mean_pairs(loss [· WPO weight]) → (scalar loss, per-pair metrics of `reward_metrics`)."""
    if config.use_weighting and batch.pair_weights is None:
        raise ValueError("use_weighting (WPO) needs DPOBatch.pair_weights (see wpo_weights)")
    loss = batch.chosen_logps.new_zeros(())
    for loss_type, weight in zip(config.loss_types, config.weights, strict=True):
        losses = per_pair_loss(loss_type, config, batch)
        if config.use_weighting:
            losses = losses * batch.pair_weights
        loss = loss + losses.mean() * weight
    return loss, reward_metrics(batch, config.beta)


# ---------------------------------------------------------------------------------------------------------------
# metrics, named as TRL logs them
# ---------------------------------------------------------------------------------------------------------------
def reward_metrics(batch: DPOBatch, beta: float) -> dict[str, Tensor]:
    """Per-pair values [B], detached, whose batch means are TRL's logged metrics: the implicit rewards
    r = β·log(π/π_ref) (log-ratios, not f-divergence scores), their accuracy and margin, and the policy log-probs."""
    chosen = beta * (batch.chosen_logps - batch.ref_chosen_logps).detach()
    rejected = beta * (batch.rejected_logps - batch.ref_rejected_logps).detach()
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "rewards/margins": chosen - rejected,
        "logps/chosen": batch.chosen_logps.detach(),
        "logps/rejected": batch.rejected_logps.detach(),
    }


def token_metric_sums(mask: Tensor, entropy: Tensor, mean_logits: Tensor, is_top1: Tensor
                      ) -> dict[str, tuple[Tensor, Tensor]]:
    """TRL's token-level metrics as (sum, count) pairs, so ranks can add both before dividing (TRL's gather):
    entropy over all completion tokens, mean logit over chosen / rejected tokens, top-1 accuracy over chosen tokens.
    Every input is [2B, T] (chosen rows first)."""
    mask = mask.bool()
    chosen_mask, rejected_mask = mask.chunk(2)
    chosen_logits, rejected_logits = mean_logits.detach().chunk(2)
    chosen_top1, _ = is_top1.chunk(2)
    return {
        "entropy": ((entropy.detach() * mask).sum(), mask.sum()),
        "logits/chosen": (chosen_logits[chosen_mask].sum(), chosen_mask.sum()),
        "logits/rejected": (rejected_logits[rejected_mask].sum(), rejected_mask.sum()),
        "mean_token_accuracy": ((chosen_top1 & chosen_mask).sum(), chosen_mask.sum()),
    }
