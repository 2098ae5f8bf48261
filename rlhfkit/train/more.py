"""MORE: multi-objective reward learning over preference data from several sources (`rm_train.py --objective more`),
and its fixed-weight baseline (`--objective multitask`).

Paper: Zeng et al. 2023, "On Diversified Preferences of Large Language Model Alignment" (arXiv:2312.07401); reference
code: github.com/dunzeng/MORE (`trainer.py`, `min_norm_solvers.py`, `utils.py`). The min-norm solver is MGDA
(Désidéri 2012; Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization"). Written here by hand:
no maintained library offers a min-norm solver or per-source reweighting for a `transformers.Trainer`.

Per training step (every batch holds rows of every source, see `SourceBalancedBatchSampler`):

1. One pairwise forward gives rewards r_c, r_r [B] and, through a forward hook, the reward head's input features.
2. Per source k: L_k = Bradley-Terry loss over the rows of source k (`rlhfkit.train.losses.bradley_terry_loss`).
3. Per source k: g_k = ∂L_k/∂w, the gradient with respect to the reward head's weight row w [H]
   (= Σ_i ∂L_k/∂r_i · h_i with h_i the head input of sequence i; see `head_gradients`).
4. Momentum per source: m_k ← (1 − α) m_k + α g_k.
5. Normalisation (`--normalize l2`: m_k / ‖m_k‖; `none`: as is).
6. λ = argmin_{λ ∈ simplex} ‖Σ_k λ_k m̂_k‖² (closed form for two sources, Frank-Wolfe for more).
7. loss = Σ_k w_k L_k, back-propagated once through the whole model (w is a constant), with w chosen by
   `--more_weighting`:
   - `reference` (the default; the paper's method): w = λ, as the reference's `compute_lambda` →
     `more_ranking_loss(weights=λ)`; λ from `reference_min_norm_weights`, the reference solver's numbers
     (`find_min_norm_element_FW`: its two-vector rule with the 0.001 / 0.999 boundary values, Frank-Wolfe stopped
     when Σ|Δλ| < 1e-5). With two sources and `--normalize l2` this is always λ = (½, ½): plain multitask.
   - `inverse_norm` (ours, the rule this toolkit shipped as `more` before): w_k = (λ_k / n_k) / Σ_j (λ_j / n_j), n_k the
     divisor of step 5 (‖m_k‖ for l2, 1 for none), λ from our exact solver (`min_norm_weights`).

Where we follow the reference:
- The gradients fed to the solver are those of the reward head only (the reference builds a copy of the head on the
  CPU and back-propagates each per-source loss through it); the whole network is then trained with the weighted loss.
- `alpha` weights the *current* gradient (reference `compute_lambda`: grad_m = (1 − α)·grad_m + α·grad). The default
  0.99 therefore keeps 1% of the history; α = 1 disables the momentum; smaller α smooths more. This is the opposite
  of the usual "decay" convention; we keep the reference's so that `--alpha` means what the paper's scripts mean.
- Momentum is applied to the raw gradients, normalisation after it, then the solver (same order as the reference).
- Frank-Wolfe for three or more sources, started from the best two-source solution (reference: MGDA-UB's
  `find_min_norm_element_FW`); the two-source case is solved in closed form.
- Each step sees every source in equal numbers (the reference's `--resampling` mode draws one row per source per
  group); small sources are cycled through more often than large ones.

Where we differ, and why:
- g_k is computed in closed form from the head's input features and ∂L_k/∂r (taken by autograd on *detached*
  copies of the rewards), never by a backward pass through the model or a read of the head weights. The head weights
  are not needed at all, so this works unchanged under LoRA (frozen or `modules_to_save` head), under DDP (the
  per-source gradients are averaged over processes so every process uses the same λ), and under ZeRO-3, where the
  head weight is partitioned and an extra backward through DeepSpeed's module hooks would upset its parameter
  prefetching. The reference gathers the head weight with `safe_get_full_fp32_param` instead and recomputes the
  rewards on the CPU; the gradient is the same, because ∂L_k/∂w depends on w only through the rewards.
- The reference initialises the momentum buffer with a randomly initialised head's weights (so the first λ mixes
  the first gradient with a random vector); we initialise it with the first observed gradient.
- Only under `--more_weighting inverse_norm`: the losses are weighted by λ_k/n_k (step 7), not by λ_k. The argument
  for it: with l2 normalisation the solver finds the min-norm
  point of the *normalised* gradients, Σ λ_k·g_k/‖g_k‖, MGDA's common descent direction; weighting the raw losses by
  λ_k (as the reference and Sener & Koltun's code do) steps along Σ λ_k·g_k instead, which is not that direction
  and, with two sources, is always plain averaging: two unit vectors always give λ = (½, ½), so the reference's
  MORE with two sources and `--normalize l2` is exactly the multitask baseline. Our weights make the combined head
  gradient Σ w_k·g_k point along the direction the solver chose (for two sources: the bisector of the two gradients,
  i.e. each source weighted inversely to its gradient norm). With `--normalize none` n_k = 1 and the weights are
  λ (of our exact solver, which differs from the reference's only at its 0.001 / 0.999 boundary values and in the
  Frank-Wolfe stopping rule).
  As in any MGDA variant the step shrinks with the smallest per-source gradients (with `none` the min-norm point
  is no longer than the shortest gradient; with `l2` and two sources the combined head gradient is at most the
  harmonic mean of the two norms), so a source that is already fit almost perfectly slows the others down.
- Σ_k w_k = 1 with each L_k a per-source mean: the scale of a plain BT loss. The reference's `more_ranking_loss`
  sums the weighted pair losses, multiplies by the number of sources and divides by all pairs; with as many rows per
  source (its `--resampling` mode, our sampler) that is the same Σ_k λ_k L_k.
- `inverse_norm` only: two-source solutions are exact in [0, 1]; the reference (and `reference`) uses 0.001 / 0.999.
- Normalisations `loss` and `loss+` of the reference are not offered (the paper's runs use `l2`).
- In evaluation the trainer falls back to the plain pooled BT loss, as the reference does.

Assumptions: the reward head is a linear map of the last hidden state with one output (every HF
`*ForSequenceClassification` decoder: `score`; encoders: `classifier`), the rewards of decoders are read at the last
non-pad token (as HF does), and `per_device_train_batch_size ≥` the number of sources.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
from torch import nn

from rlhfkit.errors import UserError
from rlhfkit.models import REWARD_HEAD_NAMES as _REWARD_HEAD_NAMES

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("l2", "none")
WEIGHTINGS = ("reference", "inverse_norm")  # --more_weighting
OBJECTIVES = ("bt", "multitask", "more")


# ---------------------------------------------------------------------------------------------------------------
# min-norm solver (pure)
# ---------------------------------------------------------------------------------------------------------------
def min_norm_two(v11: float, v12: float, v22: float) -> tuple[float, float]:
    """min over γ ∈ [0, 1] of ‖γ·x1 + (1 − γ)·x2‖², given v11 = ⟨x1,x1⟩, v12 = ⟨x1,x2⟩, v22 = ⟨x2,x2⟩.

    Setting the derivative to zero gives γ* = (v22 − v12) / (v11 − 2·v12 + v22) = ⟨x2 − x1, x2⟩ / ‖x1 − x2‖²,
    clipped to [0, 1]. When x1 = x2 every γ is optimal; we return 0.5. Returns (γ, ‖γ·x1 + (1 − γ)·x2‖²).
    """
    denominator = v11 - 2.0 * v12 + v22
    if denominator <= 1e-20 * max(abs(v11), abs(v22), 1e-300):
        gamma = 0.5
    else:
        gamma = min(1.0, max(0.0, (v22 - v12) / denominator))
    cost = gamma * gamma * v11 + 2.0 * gamma * (1.0 - gamma) * v12 + (1.0 - gamma) ** 2 * v22
    return gamma, cost


def min_norm_weights_from_gram(gram: torch.Tensor, max_iter: int = 1000, tol: float = 1e-10) -> torch.Tensor:
    """Weights λ on the simplex minimising λᵀ G λ = ‖Σ_k λ_k x_k‖², given the Gram matrix G [K, K] of the x_k.

    K = 1: [1]. K = 2: closed form (`min_norm_two`). K ≥ 3: Frank-Wolfe with exact line search, started from the best
    pair, stopped when λᵀGλ − min_t (Gλ)_t (half the Frank-Wolfe duality gap, so at least half the excess
    λᵀGλ − min) falls below `tol` × max_k G_kk. Returns λ [K] float64 on the CPU.
    """
    gram = gram.detach().to(device="cpu", dtype=torch.float64)
    k = gram.shape[0]
    if gram.shape != (k, k) or k == 0:
        raise ValueError(f"gram must be a non-empty square matrix, got {tuple(gram.shape)}")
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    scale = max(float(gram.diagonal().max()), 1e-300)
    # best pair first: exact for K = 2, a good start for Frank-Wolfe otherwise
    best = None
    for i in range(k):
        for j in range(i + 1, k):
            gamma, cost = min_norm_two(float(gram[i, i]), float(gram[i, j]), float(gram[j, j]))
            if best is None or cost < best[0] - 1e-15 * scale:
                best = (cost, i, j, gamma)
    _, i, j, gamma = best
    weights = torch.zeros(k, dtype=torch.float64)
    weights[i], weights[j] = gamma, 1.0 - gamma
    if k == 2:
        return weights
    for _ in range(max_iter):
        gram_weights = gram @ weights  # half the gradient of λᵀGλ
        vertex = int(torch.argmin(gram_weights))
        current = float(weights @ gram_weights)
        if current - float(gram_weights[vertex]) <= tol * scale:
            break
        # exact line search on the segment from λ to the vertex e_t: a two-point min-norm problem
        step_keep, _ = min_norm_two(current, float(gram_weights[vertex]), float(gram[vertex, vertex]))
        weights = step_keep * weights
        weights[vertex] += 1.0 - step_keep
    return weights


def min_norm_weights(vectors: torch.Tensor, max_iter: int = 1000, tol: float = 1e-10) -> torch.Tensor:
    """λ on the simplex minimising ‖Σ_k λ_k vectors[k]‖². vectors: [K, D]. Returns λ [K] float64 on the CPU."""
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be [K, D], got {tuple(vectors.shape)}")
    flat = vectors.detach().double()
    return min_norm_weights_from_gram(flat @ flat.T, max_iter=max_iter, tol=tol)


def reference_min_norm_two(v11: float, v12: float, v22: float) -> tuple[float, float]:
    """MinNormSolver._min_norm_element_from2 of the reference (min_norm_solvers.py): γ for γ·x1 + (1 − γ)·x2 and the
    squared norm, with its boundary cases: γ = 0.999 (cost v11) when v12 ≥ v11, γ = 0.001 (cost v22) when v12 ≥ v22."""
    if v12 >= v11:
        return 0.999, v11
    if v12 >= v22:
        return 0.001, v22
    gamma = -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))
    return gamma, v22 + gamma * (v12 - v22)


REFERENCE_MAX_ITER = 1000  # MinNormSolver.MAX_ITER
REFERENCE_STOP_CRIT = 1e-5  # MinNormSolver.STOP_CRIT


def reference_min_norm_weights(vectors: torch.Tensor) -> torch.Tensor:
    """λ as the reference's `MinNormSolver.find_min_norm_element_FW(vectors)` computes it. vectors: [K, D] → [K].

    Best pair first (`_min_norm_2d_accelerated`: the pair of least cost, first found on equal cost, starting cost
    1e8), returned as is for K = 2; for K ≥ 3 Frank-Wolfe: the vertex t = argmin (Gλ)_t, a line search between λ and
    e_t by `reference_min_norm_two`, stopped when Σ|Δλ| < 1e-5 (returning the λ *before* that step) or after 1000
    steps. float64 on the CPU. Written from the reference's description, not copied.
    """
    if vectors.dim() != 2 or vectors.shape[0] == 0:
        raise ValueError(f"vectors must be [K, D] with K ≥ 1, got {tuple(vectors.shape)}")
    flat = vectors.detach().to("cpu", torch.float64)
    k = flat.shape[0]
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    gram = (flat @ flat.T).tolist()
    best_cost, best = 1e8, None
    for i in range(k):
        for j in range(i + 1, k):
            gamma, cost = reference_min_norm_two(gram[i][i], gram[i][j], gram[j][j])
            if cost < best_cost:
                best_cost, best = cost, (i, j, gamma)
    if best is None:  # every pair costs ≥ 1e8 (huge gradients): the reference would fail here; take the first pair
        i, j = 0, 1
        best = (i, j, reference_min_norm_two(gram[0][0], gram[0][1], gram[1][1])[0])
    i, j, gamma = best
    weights = [0.0] * k
    weights[i], weights[j] = gamma, 1.0 - gamma
    if k == 2:
        return torch.tensor(weights, dtype=torch.float64)
    g = torch.tensor(gram, dtype=torch.float64)
    solution = torch.tensor(weights, dtype=torch.float64)
    for _ in range(REFERENCE_MAX_ITER):
        g_solution = g @ solution
        vertex = int(torch.argmin(g_solution))
        v11 = float(solution @ g_solution)
        v12 = float(solution @ g[:, vertex])
        v22 = float(g[vertex, vertex])
        keep, _ = reference_min_norm_two(v11, v12, v22)
        new = keep * solution
        new[vertex] += 1 - keep
        if float((new - solution).abs().sum()) < REFERENCE_STOP_CRIT:
            return solution
        solution = new
    return solution


def normalize_gradients(gradients: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, D] → ([K, D] normalised rows, [K] the divisor of each row).

    `l2`: each row divided by its norm (a zero row is left as is, divisor 1); `none`: unchanged, divisors 1.
    """
    ones = torch.ones(gradients.shape[0], dtype=gradients.dtype, device=gradients.device)
    if how == "none":
        return gradients, ones
    if how == "l2":
        norms = gradients.norm(dim=1)
        divisors = torch.where(norms > 0, norms, ones)
        return gradients / divisors[:, None], divisors
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not '{how}'")


def loss_weights(solution: torch.Tensor, divisors: torch.Tensor) -> torch.Tensor:
    """Per-source loss weights whose combined gradient points along the min-norm element Σ_k λ_k·g_k/n_k.

    Weighting loss k by λ_k/n_k makes Σ_k w_k·g_k parallel to the solver's direction; dividing by Σ_k λ_k/n_k keeps
    Σ_k w_k = 1 (the loss scale of a plain BT loss). solution λ [K], divisors n [K] → w [K].
    """
    raw = solution / divisors
    return raw / raw.sum()


class MoreWeighting:
    """The stateful part of MORE: per-source gradient momentum, normalisation, min-norm weights.

    `update(gradients [P, D], present [P] source indices) -> loss weights [P]` (float32, sum 1).
    `weighting="reference"` (the paper's code): the weights are λ of `reference_min_norm_weights` on the normalised
    momenta; `"inverse_norm"`: `loss_weights(λ, divisors)` with our exact solver (see the module docstring).
    Sources absent from a step keep their momentum and take no part in that step's solve.
    """

    def __init__(self, num_sources: int, alpha: float = 0.99, normalize: str = "l2", weighting: str = "reference"):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"more_weighting must be one of {WEIGHTINGS}, not '{weighting}'")
        self.weighting = weighting
        if num_sources < 1:
            raise ValueError("num_sources must be ≥ 1")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not '{normalize}'")
        self.num_sources = num_sources
        self.alpha = alpha
        self.normalize = normalize
        self.momentum: list[torch.Tensor | None] = [None] * num_sources

    def update(self, gradients: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
        present = [int(index) for index in present]
        if gradients.dim() != 2 or gradients.shape[0] != len(present):
            raise ValueError(f"gradients must be [{len(present)}, D], got {tuple(gradients.shape)}")
        rows = []
        for row, index in zip(gradients.detach().double().cpu(), present):
            previous = self.momentum[index]
            smoothed = row if previous is None else (1.0 - self.alpha) * previous + self.alpha * row
            self.momentum[index] = smoothed
            rows.append(smoothed)
        normalised, divisors = normalize_gradients(torch.stack(rows), self.normalize)
        if self.weighting == "reference":
            return reference_min_norm_weights(normalised).float()
        return loss_weights(min_norm_weights(normalised), divisors).float()

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "normalize": self.normalize, "weighting": self.weighting,
                "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        momentum = list(state["momentum"])
        if len(momentum) != self.num_sources:
            raise ValueError(f"saved MORE state has {len(momentum)} sources, this run has {self.num_sources}")
        self.momentum = momentum


# ---------------------------------------------------------------------------------------------------------------
# per-source losses and reward-head gradients (pure functions of tensors)
# ---------------------------------------------------------------------------------------------------------------
def per_source_losses(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    source_index: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> tuple[list[int], list[torch.Tensor], list[dict]]:
    """Bradley-Terry loss of each source present in the batch.

    chosen_rewards, rejected_rewards, source_index (int), margin: [B]. Returns (present source indices, ascending;
    [] loss per present source; metrics dict per present source), from `rlhfkit.train.losses.bradley_terry_loss`.
    """
    from rlhfkit.train.losses import bradley_terry_loss

    if source_index.shape != chosen_rewards.shape:
        raise ValueError(f"source_index must be [B] like the rewards, got {tuple(source_index.shape)}")
    present = sorted(int(index) for index in torch.unique(source_index.detach().cpu()))
    losses, metrics = [], []
    for index in present:
        mask = source_index == index
        loss, stats = bradley_terry_loss(
            chosen_rewards[mask],
            rejected_rewards[mask],
            margin=margin[mask] if margin is not None else None,
            center_coefficient=center_coefficient,
        )
        losses.append(loss)
        metrics.append(stats)
    return present, losses, metrics


def reward_gradients(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    source_index: torch.Tensor,
    present: Sequence[int],
    margin: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """∂L_k/∂r for every present source k: [P, 2B] (chosen rewards first, then rejected, the collator's order).

    Taken by autograd on detached copies of the rewards, so nothing flows back into the model (no DeepSpeed hooks
    run) and the derivative is exactly that of the loss actually trained (`per_source_losses`).
    """
    chosen = chosen_rewards.detach().float().requires_grad_(True)
    rejected = rejected_rewards.detach().float().requires_grad_(True)
    with torch.enable_grad():
        found, losses, _ = per_source_losses(chosen, rejected, source_index, margin, center_coefficient)
        by_index = dict(zip(found, losses))
        rows = []
        for index in present:
            d_chosen, d_rejected = torch.autograd.grad(by_index[int(index)], (chosen, rejected))
            rows.append(torch.cat([d_chosen, d_rejected]))
    return torch.stack(rows)


def head_gradients(reward_grads: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Gradient of each per-source loss w.r.t. the weight row of a linear reward head r = w·h (+ b).

    reward_grads: [P, N] ∂L_k/∂r_n. features: [N, H] the head input h_n of the sequence whose reward is r_n.
    Returns [P, H] = reward_grads @ features, since ∂r_n/∂w = h_n.
    """
    if reward_grads.shape[1] != features.shape[0]:
        raise ValueError(f"reward_grads [P, {reward_grads.shape[1]}] and features [{features.shape[0]}, H] disagree")
    return reward_grads.float() @ features.float()


# ---------------------------------------------------------------------------------------------------------------
# reading the reward head's input
# ---------------------------------------------------------------------------------------------------------------
def base_model(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed engine
        model = model.module
    return model


def find_reward_head(model: nn.Module) -> nn.Module:
    """The module that maps the last hidden state to the reward: the outermost `score`/`classifier`/`v_head`.

    Under peft this is the `ModulesToSaveWrapper` (or LoRA layer) around the head, whose input is still the hidden
    state. A non-linear classification head (e.g. RoBERTa's dense→tanh→out_proj) is replaced by its last
    one-output linear layer, whose input is what the gradient formula needs.
    """
    candidates = [
        (name, module)
        for name, module in base_model(model).named_modules()
        if name and name.rsplit(".", 1)[-1] in _REWARD_HEAD_NAMES
    ]
    if not candidates:
        raise UserError(
            f"{type(base_model(model)).__name__}: MORE needs a sequence-classification reward head named "
            f"{' or '.join(_REWARD_HEAD_NAMES)}; none found"
        )
    _, head = min(candidates, key=lambda item: item[0].count("."))
    if isinstance(head, nn.Linear) or hasattr(head, "base_layer") or hasattr(head, "modules_to_save"):
        return head
    linears = [module for module in head.modules() if isinstance(module, nn.Linear) and module.out_features == 1]
    return linears[-1] if linears else head


class HeadCapture:
    """Inputs and outputs of the reward head for every forward call made while the capture is open."""

    def __init__(self):
        self.features: list[torch.Tensor] = []  # detached head inputs [N, T, H] or [N, H]
        self.scores: list[torch.Tensor] = []  # detached head outputs [N, T, 1] or [N, 1]

    def pooled_features(self, rewards: torch.Tensor, input_ids: torch.Tensor | None, pad_token_id: int | None):
        """Head input [2B, H] of the position each reward [2B] was read from.

        2-D head inputs (encoders pool before the head) are already per sequence. For decoders the reward is read at
        the last non-pad token, as HF's `*ForSequenceClassification` does; the choice is checked against the head's
        own output at that position, so a model that pools differently fails loudly instead of training on the
        wrong features.
        """
        if not self.features:
            raise RuntimeError("the reward head was not called during the forward pass (MORE cannot see its input)")
        features = torch.cat(self.features) if len(self.features) > 1 else self.features[0]
        scores = torch.cat(self.scores) if len(self.scores) > 1 else self.scores[0]
        rewards = rewards.detach().reshape(-1)
        if features.shape[0] != rewards.shape[0]:
            raise RuntimeError(f"reward head saw {features.shape[0]} sequences, the batch has {rewards.shape[0]}")
        if scores.shape[-1] != 1:
            raise UserError(f"MORE needs a reward head with one output, this one has {scores.shape[-1]}")
        if features.dim() == 2:
            return features
        if input_ids is None or pad_token_id is None:
            raise RuntimeError("a decoder reward head needs input_ids and config.pad_token_id to locate the reward")
        non_pad = (input_ids != pad_token_id).to(torch.int64)
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        last = (positions * non_pad).argmax(-1)
        rows = torch.arange(features.shape[0], device=features.device)
        read = scores[rows, last.to(scores.device), 0].to(rewards.dtype)
        if not torch.allclose(read, rewards.to(read.device), rtol=1e-4, atol=1e-5):
            raise RuntimeError(
                "the rewards are not the head's output at the last non-pad token; MORE cannot tell which hidden "
                "state produced each reward for this model class"
            )
        return features[rows, last.to(features.device)]


@contextlib.contextmanager
def capture_reward_head(model: nn.Module):
    """Record the reward head's inputs and outputs (detached) during the forward passes inside the block."""
    head = find_reward_head(model)
    capture = HeadCapture()

    def hook(module, args, kwargs, output):
        features = args[0] if args else next(iter(kwargs.values()))
        scores = output if torch.is_tensor(output) else output[0]
        capture.features.append(features.detach())
        capture.scores.append(scores.detach())

    handle = head.register_forward_hook(hook, with_kwargs=True)
    try:
        yield capture
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# the combination used by the trainers (and, on a toy model, by the tests)
# ---------------------------------------------------------------------------------------------------------------
class SourceWeightedLoss:
    """Σ_k w_k · L_k over the sources present in a batch; w from MORE (`MoreWeighting`) or uniform ("multitask").

    Call with the batch rewards, source indices and, for MORE, the pooled head features [2B, H]. Returns the loss
    and a dict of detached metrics: per-source loss, accuracy and weight, keyed by source name.
    """

    def __init__(self, objective: str, source_names: Sequence[str], alpha: float = 0.99, normalize: str = "l2",
                 center_coefficient: float = 0.0, reduce_fn=None, weighting: str = "reference"):
        if objective not in ("more", "multitask"):
            raise ValueError(f"objective must be 'more' or 'multitask', not '{objective}'")
        self.objective = objective
        self.source_names = list(source_names)
        self.center_coefficient = center_coefficient
        self.weighting = (MoreWeighting(len(self.source_names), alpha, normalize, weighting)
                          if objective == "more" else None)
        # sums a tensor over processes (None: one process); per-source gradients are averaged with it so that every
        # process computes the same λ
        self.reduce_fn = reduce_fn

    def __call__(self, chosen_rewards, rejected_rewards, source_index, margin=None, features=None):
        present, losses, stats = per_source_losses(
            chosen_rewards, rejected_rewards, source_index, margin, self.center_coefficient
        )
        if present and present[-1] >= len(self.source_names):
            raise UserError(f"batch has source index {present[-1]} but only {len(self.source_names)} sources are known")
        if self.objective == "multitask" or len(present) == 1:
            weights = torch.full((len(present),), 1.0 / len(present))
        else:
            if features is None:
                raise ValueError("MORE needs the pooled head features of the batch")
            grads = head_gradients(
                reward_gradients(chosen_rewards, rejected_rewards, source_index, present, margin,
                                 self.center_coefficient),
                features,
            )
            if self.reduce_fn is not None:
                grads = self._mean_over_processes(grads, present)
            weights = self.weighting.update(grads, present)
        loss = sum(weight.to(loss_k.dtype) * loss_k for weight, loss_k in zip(weights.to(losses[0].device), losses))
        metrics = {}
        for index, loss_k, stats_k, weight in zip(present, losses, stats, weights):
            name = self.source_names[index]
            metrics[f"loss/{name}"] = float(loss_k.detach())
            metrics[f"accuracy/{name}"] = float(stats_k["accuracy"])
            metrics[f"weight/{name}"] = float(weight)
        return loss, metrics


    def _mean_over_processes(self, grads: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
        """Average per-source gradients over processes, each source over the processes whose batch held it."""
        total = torch.zeros(len(self.source_names), grads.shape[1] + 1, dtype=torch.float32)
        for row, index in zip(grads.float().cpu(), present):
            total[index, :-1] = row
            total[index, -1] = 1.0
        total = self.reduce_fn(total)  # sum over processes
        rows = [total[index, :-1] / total[index, -1].clamp(min=1.0) for index in present]
        return torch.stack(rows)
