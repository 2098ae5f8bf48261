"""Bradley-Terry loss: values against hand computation, margin and centering terms, gradients, metrics."""

import math

import pytest
import torch

from rlhfkit.train.losses import bradley_terry_loss


def test_value_matches_hand_computation():
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([1.0, 0.0, 1.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    expected = sum(-math.log(1 / (1 + math.exp(-d))) for d in (1.0, 0.0, -2.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert metrics["margin_mean"].item() == pytest.approx(-1 / 3)
    both = torch.tensor([2.0, 0.0, -1.0, 1.0, 0.0, 1.0])
    assert metrics["reward_mean"].item() == pytest.approx(both.mean().item())
    assert metrics["reward_std"].item() == pytest.approx(both.std(unbiased=False).item())


def test_margin_shifts_the_logit():
    chosen, rejected = torch.tensor([3.0]), torch.tensor([1.0])
    with_margin, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([2.0]))
    assert with_margin.item() == pytest.approx(math.log(2.0))  # σ(0) = 1/2
    without, _ = bradley_terry_loss(chosen, rejected)
    assert without.item() < with_margin.item()


def test_centering_adds_mean_squared_sum():
    chosen, rejected = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    base, _ = bradley_terry_loss(chosen, rejected)
    centered, _ = bradley_terry_loss(chosen, rejected, center_coefficient=0.1)
    assert (centered - base).item() == pytest.approx(0.1 * (1.0 + 9.0) / 2)


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.zeros(4, requires_grad=True)
    rejected = torch.zeros(4, requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected)
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    assert torch.allclose(chosen.grad, -rejected.grad)


def test_invariant_to_shared_offset_without_centering():
    chosen, rejected = torch.randn(8), torch.randn(8)
    a, _ = bradley_terry_loss(chosen, rejected)
    b, _ = bradley_terry_loss(chosen + 5, rejected + 5)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(3, 1), torch.zeros(3, 1))
