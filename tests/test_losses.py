"""The KD losses against hand computations: T² scaling, the α mix, masking, reduction, closed forms."""

import math

import pytest
import torch

from kdflow.training.losses import IGNORE_INDEX, cross_entropy, hinton_loss, kd_kl, soft_targets


def softmax(xs, t=1.0):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


ZS, ZT = [1.0, 2.0, 0.5], [3.0, -1.0, 0.0]


def test_soft_targets_is_softmax_of_logits_over_t():
    got = soft_targets(torch.tensor([ZT]), 4.0)[0].tolist()
    assert got == pytest.approx(softmax(ZT, 4.0), abs=1e-6)
    # a higher temperature is softer: the top class loses mass
    assert soft_targets(torch.tensor(ZT), 10.0).max() < soft_targets(torch.tensor(ZT), 1.0).max()


@pytest.mark.parametrize("t", [1.0, 2.0, 5.0])
def test_kd_kl_is_t_squared_times_kl_of_softened_distributions(t):
    expected = t**2 * kl(softmax(ZT, t), softmax(ZS, t))
    got = kd_kl(torch.tensor([ZS]), torch.tensor([ZT]), t)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_kl_is_zero_on_identical_distributions_and_accepts_teacher_log_probs():
    z = torch.randn(4, 7, 11)
    assert kd_kl(z, z.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    # log-probs are logits shifted per position: same soft targets, same loss at any T
    assert kd_kl(z + 1.0, torch.log_softmax(z, -1), 2.5).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl(torch.randn(4, 7, 11), z, 2.0).item() > 0


def test_kd_kl_teacher_with_minus_inf_classes_is_finite():
    teacher = torch.tensor([[2.0, float("-inf"), 0.0]])  # e.g. a class outside a cached top-k
    got = kd_kl(torch.tensor([ZS]), teacher, 2.0)
    top, rest = softmax([2.0, 0.0], 2.0)
    expected = 4.0 * kl([top, 0.0, rest], softmax(ZS, 2.0))
    assert torch.isfinite(got) and got.item() == pytest.approx(expected, rel=1e-5)


def test_mask_and_reductions_on_sequence_shapes():
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    per = kd_kl(student, teacher, 2.0, reduction="none")
    assert per.shape == (2, 3)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert kd_kl(student, teacher, 2.0, mask, "sum").item() == pytest.approx(per[mask].sum().item(), rel=1e-6)
    assert kd_kl(student, teacher, 2.0, mask, "mean").item() == pytest.approx(per[mask].mean().item(), rel=1e-6)
    assert kd_kl(student, teacher, 2.0, mask, "none")[~mask].abs().sum() == 0
    assert kd_kl(student, teacher, 2.0, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0  # not NaN


def test_cross_entropy_by_hand_and_ignore_index():
    logits, labels = torch.tensor([ZS, ZT]), torch.tensor([1, 0])
    expected = (-math.log(softmax(ZS)[1]) - math.log(softmax(ZT)[0])) / 2
    assert cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    ignored = cross_entropy(logits, torch.tensor([1, IGNORE_INDEX]))
    assert ignored.item() == pytest.approx(-math.log(softmax(ZS)[1]), rel=1e-6)


@pytest.mark.parametrize("alpha,t", [(0.0, 1.0), (0.3, 4.0), (0.5, 2.0), (1.0, 3.0)])
def test_hinton_loss_is_the_alpha_mix_of_ce_and_t2_kl(alpha, t):
    y = 1
    hand = alpha * -math.log(softmax(ZS)[y]) + (1 - alpha) * t**2 * kl(softmax(ZT, t), softmax(ZS, t))
    got = hinton_loss(torch.tensor([ZS]), torch.tensor([ZT]), torch.tensor([y]), alpha, t)
    assert got.item() == pytest.approx(hand, rel=1e-5)


def test_t_squared_keeps_soft_gradients_comparable_across_temperatures():
    # Hinton et al.: the soft term's gradients scale as 1/T², so multiplying by T² keeps them O(1) as T grows
    # (in the high-T limit the gradient is (z_s - z_t)/N per logit, with zero-mean logits).
    zs, zt = torch.tensor([[0.5, -0.2, -0.3]]), torch.tensor([[0.1, 0.3, -0.4]])
    grads = []
    for t in (20.0, 100.0):
        z = zs.clone().requires_grad_(True)
        kd_kl(z, zt, t).backward()
        grads.append(z.grad)
    assert torch.allclose(grads[0], grads[1], rtol=0.05, atol=1e-4)
    assert torch.allclose(grads[1], (zs - zt) / 3, rtol=0.05, atol=1e-4)


def test_bad_arguments_are_refused():
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        kd_kl(z, z, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        hinton_loss(z, z, torch.tensor([0, 1]), 1.5, 2.0)
    with pytest.raises(ValueError, match="same shape"):
        kd_kl(z, torch.randn(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        kd_kl(z, z, 1.0, reduction="batchmean")


def test_hard_label_only_needs_no_teacher():
    z, y = torch.tensor([ZS]), torch.tensor([2])
    assert hinton_loss(z, None, y, 1.0, 4.0).item() == pytest.approx(cross_entropy(z, y).item())
    with pytest.raises(ValueError, match="teacher's logits"):
        hinton_loss(z, None, y, 0.5, 4.0)
