"""The KD losses (kdflow/training/losses.py) against hand computations and closed forms: Hinton's T² scaling and α
mix, masking, reduction; each white-box divergence (identical inputs -> 0, JSD's β = 0 / 1 -> forward / reverse KL,
skew λ = 0 -> KL); the sparse top-k tail policy; non-finite teachers."""

import math

import pytest
import torch

from kdflow.config.kd import Divergence
from kdflow.logit_cache.format import TAIL_FLOOR, rebuild_logprobs, sparse_target
from kdflow.training.losses import (
    IGNORE_INDEX,
    cross_entropy,
    divergence,
    hinton_loss,
    kd_kl,
    kd_loss,
    soft_targets,
    sparse_kd_loss,
    student_buckets,
    teacher_buckets,
)


def softmax(xs, t=1.0):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def logp(*probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# ---- Hinton's KD on dense logits (kd_kl, hinton_loss) ----------------------------------------------------------

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


# ---- white-box divergences, dense and over a cached top-k -----------------------------------------------------------

P, Q = [0.7, 0.2, 0.1], [0.3, 0.3, 0.4]


@pytest.mark.parametrize("kind", list(Divergence))
def test_each_divergence_is_zero_on_identical_distributions_and_positive_otherwise(kind):
    z = torch.randn(4, 5, 11, generator=torch.Generator().manual_seed(0))
    assert kd_loss(z, z.clone(), kind, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(z, z + 1.5, kind).item() == pytest.approx(0.0, abs=1e-6)  # softmax is shift-invariant
    other = torch.randn(4, 5, 11, generator=torch.Generator().manual_seed(1))
    assert kd_loss(z, other, kind, temperature=2.0).item() > 1e-3


def test_forward_and_reverse_kl_closed_forms():
    assert divergence(logp(*P), logp(*Q), Divergence.forward_kl).item() == pytest.approx(kl(P, Q))
    assert divergence(logp(*P), logp(*Q), Divergence.reverse_kl).item() == pytest.approx(kl(Q, P))


def test_jsd_reduces_to_its_closed_forms():
    p, q = logp(*P), logp(*Q)
    assert divergence(p, q, Divergence.jsd, beta=0.0).item() == pytest.approx(kl(P, Q))
    assert divergence(p, q, Divergence.jsd, beta=1.0).item() == pytest.approx(kl(Q, P))
    m = [(a + b) / 2 for a, b in zip(P, Q)]  # the classic Jensen-Shannon divergence at β = 0.5
    assert divergence(p, q, Divergence.jsd, beta=0.5).item() == pytest.approx(0.5 * kl(P, m) + 0.5 * kl(Q, m))
    b = 0.3
    m = [b * a + (1 - b) * c for a, c in zip(P, Q)]
    assert divergence(p, q, Divergence.jsd, beta=b).item() == pytest.approx(b * kl(P, m) + (1 - b) * kl(Q, m))
    # β = 0 and 1 are the limits of JSD(β)/β and JSD(β)/(1 − β), so the convention is continuous
    eps = 1e-5
    assert divergence(p, q, Divergence.jsd, beta=eps).item() / eps == pytest.approx(kl(P, Q), rel=1e-3)
    assert divergence(p, q, Divergence.jsd, beta=1 - eps).item() / eps == pytest.approx(kl(Q, P), rel=1e-3)


def test_skew_variants_reduce_to_their_closed_forms():
    p, q = logp(*P), logp(*Q)
    assert divergence(p, q, Divergence.skew_kl, skew=0.0).item() == pytest.approx(kl(P, Q))
    assert divergence(p, q, Divergence.skew_reverse_kl, skew=0.0).item() == pytest.approx(kl(Q, P))
    lam = 0.1
    assert divergence(p, q, Divergence.skew_kl, skew=lam).item() == pytest.approx(
        kl(P, [lam * a + (1 - lam) * c for a, c in zip(P, Q)])
    )
    assert divergence(p, q, Divergence.skew_reverse_kl, skew=lam).item() == pytest.approx(
        kl(Q, [lam * c + (1 - lam) * a for a, c in zip(P, Q)])
    )
    # where the student gives a class ~0 mass, KL blows up and the skewed one stays bounded by -log λ
    q0 = logp(0.5, 0.5 - 1e-30, 1e-30)
    assert divergence(p, q0, Divergence.forward_kl).item() > 6
    assert divergence(p, q0, Divergence.skew_kl, skew=lam).item() < -math.log(lam)


def test_total_variation_closed_form():
    assert divergence(logp(*P), logp(*Q), Divergence.tv).item() == pytest.approx(0.5 * (0.4 + 0.1 + 0.3))


def test_a_divergence_is_chosen_by_enum_not_by_substring():
    with pytest.raises(ValueError):
        divergence(logp(*P), logp(*Q), "kl")
    with pytest.raises(ValueError, match="beta"):
        divergence(logp(*P), logp(*Q), Divergence.jsd, beta=1.5)


def test_t_squared_keeps_the_gradient_comparable_across_temperatures():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(64, 50, generator=g), torch.randn(64, 50, generator=g)

    def grad_norm(temperature, scaled=True):
        s = student.clone().requires_grad_(True)
        loss = kd_loss(s, teacher, Divergence.forward_kl, temperature)
        (loss if scaled else loss / temperature**2).backward()
        return s.grad.norm().item()

    # T²·KL's gradient tends to (z_s − z_t − mean)/(C·N) as T grows: the same size at T = 4 and T = 8 ...
    assert 0.8 < grad_norm(8.0) / grad_norm(4.0) < 1.25
    # ... while the unscaled term's gradient shrinks as 1/T² (so the check above can fail)
    assert grad_norm(8.0, scaled=False) / grad_norm(4.0, scaled=False) < 0.4


def test_masked_positions_do_not_count():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 9, generator=g), torch.randn(2, 6, 9, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    for kind in Divergence:
        before = kd_loss(s, t, kind, 2.0, mask)
        s2 = s.clone()
        s2[~mask] = torch.randn(int((~mask).sum()), 9, generator=g) * 5
        assert kd_loss(s2, t, kind, 2.0, mask).item() == pytest.approx(before.item(), rel=1e-6)
        per_pos = kd_loss(s, t, kind, 2.0, reduction="none")
        assert before.item() == pytest.approx((per_pos[mask].sum() / mask.sum()).item(), rel=1e-6)


def test_the_sparse_loss_with_the_whole_vocabulary_is_the_dense_loss():
    g = torch.Generator().manual_seed(0)
    V = 12
    teacher = torch.log_softmax(torch.randn(5, V, generator=g), -1)
    student = torch.randn(5, V, generator=g)
    ids = teacher.argsort(-1, descending=True)
    lps = teacher.gather(-1, ids)
    tail = torch.full((5,), TAIL_FLOOR)
    for kind in Divergence:
        for T in (1.0, 2.0):
            assert sparse_kd_loss(student, ids, lps, tail, kind, T).item() == pytest.approx(
                kd_loss(student, teacher, kind, T).item(), rel=1e-4, abs=1e-6
            )


def test_sparse_buckets_follow_the_cache_tail_policy():
    g = torch.Generator().manual_seed(0)
    V, k = 40, 5
    full = torch.log_softmax(torch.randn(3, V, generator=g) * 3, -1)
    ids = full.argsort(-1, descending=True)[:, :k]
    lps = full.gather(-1, ids)
    tail = torch.log1p(-lps.exp().sum(-1))
    # at T = 1 the teacher's buckets are the cache's sparse target
    assert torch.allclose(teacher_buckets(lps, tail, V, 1.0), sparse_target(lps, tail), atol=1e-6)
    # at T = 2 they are the even-spread dense distribution the cache stands for, tempered, then bucketed
    dense = torch.log_softmax(rebuild_logprobs(ids, lps, tail, V) / 2.0, -1)
    top = dense.gather(-1, ids)
    rest = torch.logsumexp(dense.scatter(-1, ids, float("-inf")), -1, keepdim=True)
    assert torch.allclose(teacher_buckets(lps, tail, V, 2.0), torch.cat([top, rest], -1), atol=1e-5)
    # a student equal to the rebuilt teacher has zero loss; the student's buckets sum to 1
    rebuilt = rebuild_logprobs(ids, lps, tail, V)
    assert sparse_kd_loss(rebuilt, ids, lps, tail, Divergence.forward_kl).item() == pytest.approx(0, abs=1e-5)
    assert torch.allclose(student_buckets(torch.randn(3, V), ids, 1.5).exp().sum(-1), torch.ones(3), atol=1e-5)


# ---- non-finite teachers (issue 23, finding 1): no NaN gradient from a masked entry, no NaN dropped silently ------


@pytest.mark.parametrize("kind", [Divergence.forward_kl, Divergence.reverse_kl])
def test_classes_neither_side_gives_mass_add_nothing_to_the_value_or_the_gradient(kind):
    """Classes where teacher and student both have 0 mass (``-inf``) add 0 to KL and nothing to its gradient: a
    product masked after it is taken makes reverse KL's gradient NaN there (0 · (−inf − −inf))."""
    teacher = logp(0.7, 0.3, 0.0, 0.0)
    student = torch.tensor([0.5, 0.0, float("-inf"), float("-inf")], dtype=torch.float64, requires_grad=True)
    loss = divergence(teacher, torch.log_softmax(student, -1), kind)
    q = torch.softmax(student.detach(), -1)
    p, q2 = [0.7, 0.3], q[:2].tolist()
    assert loss.item() == pytest.approx(kl(p, q2) if kind is Divergence.forward_kl else kl(q2, p))
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad[2:].eq(0).all()


@pytest.mark.parametrize("kind", list(Divergence))
def test_a_nan_teacher_makes_the_loss_nan_instead_of_a_finite_loss_with_nan_gradients(kind):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, generator=g, requires_grad=True), torch.randn(3, 5, generator=g)
    t[1, 2] = float("nan")
    assert torch.isnan(kd_loss(s, t, kind))  # seen by the trainer's check, which names the step


@pytest.mark.parametrize("kind", list(Divergence))
def test_whatever_a_masked_position_of_the_teacher_holds_reaches_neither_the_loss_nor_its_gradient(kind):
    g = torch.Generator().manual_seed(0)
    s, t = (
        torch.randn(2, 4, 6, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 6, generator=g, dtype=torch.float64),
    )
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    clean = s.clone().requires_grad_()
    kd_loss(clean, t, kind, 2.0, mask).backward()
    bad = t.clone()
    bad[0, 2], bad[0, 3, 1], bad[1, 3, 0] = float("nan"), float("inf"), float("-inf")
    poisoned = s.clone().requires_grad_()
    loss = kd_loss(poisoned, bad, kind, 2.0, mask)
    loss.backward()
    assert loss.item() == pytest.approx(kd_loss(s, t, kind, 2.0, mask).item(), rel=1e-12)
    assert torch.equal(poisoned.grad, clean.grad)
    # the sparse (top-k) loss likewise: a masked position's NaN log-probs, NaN tail and an id past the vocabulary
    ids = torch.randint(0, 6, (2, 4, 3), generator=g)
    lps, tail = torch.log_softmax(torch.randn(2, 4, 4, generator=g, dtype=torch.float64), -1).split([3, 1], -1)
    tail = tail.squeeze(-1)
    clean = s.clone().requires_grad_()
    sparse_kd_loss(clean, ids, lps, tail, kind, mask=mask).backward()
    ids2, lps2, tail2 = ids.clone(), lps.clone(), tail.clone()
    ids2[0, 3], lps2[1, 1], tail2[1, 3] = 99, float("nan"), float("nan")
    poisoned = s.clone().requires_grad_()
    sparse_kd_loss(poisoned, ids2, lps2, tail2, kind, mask=mask).backward()
    assert torch.equal(poisoned.grad, clean.grad)
