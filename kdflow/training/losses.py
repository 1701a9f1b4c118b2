"""Knowledge-distillation losses: small pure functions over logits, one implementation for every path.

Every function works on a trailing class (or vocabulary) axis: ``(..., C)``, so the same code serves a
classifier's ``(B, C)`` and a language model's ``(B, L, V)``. Positions are the leading ``...`` axes; a
``mask`` of shape ``(...)`` (True = counts) drops padding explicitly, and ``reduction`` says how the
per-position values are combined:

- ``"mean"``: sum over the positions the mask keeps, divided by their number (a per-token mean for a
  language model; note this is *not* ``F.kl_div(reduction="batchmean")``, which divides by ``B`` alone);
- ``"sum"``: sum over the kept positions;
- ``"none"``: the per-position values, shape ``(...)``, with masked positions set to 0.

Teacher inputs may be raw logits or log-probabilities: softmax is shift-invariant per position, so
``softmax(log p / T) == softmax(z / T)`` and a cache of teacher log-probs can be used as it is.

Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network": soft targets
``softmax(z / T)``; the distillation term is multiplied by ``T²`` so that its gradients keep the same
magnitude as the hard-label term's when ``T`` changes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from kdflow.config.kd import Divergence  # with the recipe's kd section, so that a recipe loads without torch

Reduction = Literal["mean", "sum", "none"]
IGNORE_INDEX = -100  # the label value transformers and TRL use for "no label at this position"


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(z / T)`` over the last axis. ``logits``: (..., C) -> probabilities (..., C)."""
    _check_temperature(temperature)
    return torch.softmax(upcast(logits) / temperature, dim=-1)


def divergence(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, kind: Divergence, beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """Per-position ``D(p ‖ q)`` from log-probabilities (..., C) -> (...). No temperature, no scaling:
    ``kd_loss`` adds both. ``beta`` is used by ``jsd`` only, ``skew`` (λ) by the skew variants only."""
    kind = Divergence(kind)  # an enum member or its exact name; anything else raises
    if teacher_logp.shape != student_logp.shape:
        raise ValueError(
            f"teacher {tuple(teacher_logp.shape)} and student {tuple(student_logp.shape)} "
            "log-probs must have the same shape (..., C)"
        )
    lp, lq = upcast(teacher_logp), upcast(student_logp)
    if kind is Divergence.forward_kl:
        return _kl(lp, lq)
    if kind is Divergence.reverse_kl:
        return _kl(lq, lp)
    if kind is Divergence.jsd:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
        if beta == 0.0:
            return _kl(lp, lq)
        if beta == 1.0:
            return _kl(lq, lp)
        m = _mix(lp, lq, beta)
        return beta * _kl(lp, m) + (1.0 - beta) * _kl(lq, m)
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew (λ) must be in [0, 1), got {skew}")
    if kind is Divergence.skew_kl:
        return _kl(lp, _mix(lp, lq, skew))
    if kind is Divergence.skew_reverse_kl:
        return _kl(lq, _mix(lq, lp, skew))
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)  # tv


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``Σ a (log a − log b)`` over the last axis; classes with a = 0 add 0 (x·log x -> 0) and no gradient.

    The difference is filled with 0 at those classes *before* the product, as TRL's and Liger's losses fill masked
    entries: a ``torch.where`` after the product gave the right value but a NaN gradient (0 · (−inf − −inf) in the
    backward). A NaN in ``a`` (a NaN teacher) is not a = 0: it makes the value NaN, where it is seen, instead of
    dropping the class silently."""
    a = log_a.exp()
    return (a * torch.where(a == 0, torch.zeros_like(a), log_a - log_b)).sum(-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, weight: float) -> torch.Tensor:
    """``log(w·a + (1 − w)·b)``, computed in log space."""
    if weight == 0.0:
        return log_b
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: Divergence = Divergence.forward_kl,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """``T² · D(softmax(z_t/T) ‖ softmax(z_s/T))`` per position, reduced over the positions ``mask`` keeps.

    ``student_logits``, ``teacher_logits``: (..., C); the teacher as logits or log-probs (``-inf`` allowed
    where it gives no mass). ``mask``: (...) or None. T² keeps the gradient's size independent of T
    (Hinton et al.): the soft-target gradient scales as 1/T² for large T.
    """
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (..., C)"
        )
    teacher_logits = kept(teacher_logits, mask)
    log_q = torch.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p = torch.log_softmax(upcast(teacher_logits) / temperature, dim=-1)
    return reduce(temperature**2 * divergence(log_p, log_q, kind, beta, skew), mask, reduction)


def kd_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Forward KL at temperature T, scaled by T²:  ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``.

    ``student_logits``, ``teacher_logits``: (..., C), teacher as logits or log-probs (may hold ``-inf``
    for classes it gives no mass, e.g. outside a cached top-k: those terms are 0, not NaN).
    ``mask``: (...) bool or None. Returns a scalar, or (...) for ``reduction="none"``.

    Per position: ``T² · Σ_c p_t,c (log p_t,c − log p_s,c)`` with ``p = softmax(z / T)``; 0 when the two
    distributions are equal, and ≥ 0 always.
    """
    return kd_loss(student_logits, teacher_logits, Divergence.forward_kl, temperature, mask, reduction)


# ---- sparse (top-k) teacher targets ---------------------------------------------------------------------
# Tail policy for a cached top-k teacher (kdflow/logit_cache/format.py): the divergence is taken over k + 1 buckets
# — the teacher's top-k ids, then one bucket for every other id — with the student's distribution collapsed
# onto the same buckets (its mass on those k ids, and the rest). Nothing is densified to the vocabulary,
# and the student is not pushed to spread its tail evenly (the cache does not know the teacher's tail
# shape, only its mass). For forward KL this is a lower bound of the full-vocabulary KL against the
# cache's even-spread tail (log-sum inequality), equal to it when the student's tail is even too.


def teacher_buckets(logprobs: torch.Tensor, tail: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """Cached top-k log-probs (..., k) and tail log-mass (...) -> (..., k + 1) log-probs at temperature T.

    The cache holds the teacher at T = 1; at another T each of the V − k tail ids (mass ``tail / (V − k)``
    each, the cache's even spread) is tempered like the top-k, so the bucket's log-mass becomes
    ``log(V − k) + (tail − log(V − k)) / T``.
    """
    _check_temperature(temperature)
    k = logprobs.shape[-1]
    log_rest = math.log(max(vocab_size - k, 1))
    bucket = log_rest + (upcast(tail) - log_rest) / temperature
    if k >= vocab_size:  # the top-k are the whole vocabulary: a stored tail is only its floor, not mass
        bucket = torch.full_like(bucket, float("-inf"))
    joint = torch.cat([upcast(logprobs) / temperature, bucket.unsqueeze(-1)], dim=-1)
    return joint - torch.logsumexp(joint, dim=-1, keepdim=True)


def student_buckets(student_logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Student logits (..., V) and the teacher's top-k ids (..., k) -> (..., k + 1) log-probs at T:
    the student's log-probs of those ids, then ``log(1 − Σ of them)`` for every other id."""
    _check_temperature(temperature)
    full = torch.log_softmax(upcast(student_logits) / temperature, dim=-1)
    top = full.gather(-1, ids.long())
    # log(1 − Σ p_top) = log(Σ p_rest): computed from the rest directly, which stays exact when the top-k
    # hold almost all the mass (1 − 0.99999 loses digits in float32; a logsumexp over the rest does not).
    rest = full.scatter(-1, ids.long(), float("-inf"))
    return torch.cat([top, torch.logsumexp(rest, dim=-1, keepdim=True)], dim=-1)


def sparse_kd_loss(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail: torch.Tensor,
    kind: Divergence = Divergence.forward_kl,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """``T² · D`` between a cached top-k teacher and the student, over k + 1 buckets (the tail policy above).

    ``student_logits``: (..., V); ``ids``, ``logprobs``: (..., k) the teacher's top-k at T = 1; ``tail``:
    (...) its log tail mass; ``mask``: (...) or None.
    """
    ids, logprobs, tail = kept(ids, mask), kept(logprobs, mask), kept(tail, mask)
    p = teacher_buckets(logprobs, tail, student_logits.shape[-1], temperature)
    q = student_buckets(student_logits, ids, temperature)
    return reduce(temperature**2 * divergence(p, q, kind, beta, skew), mask, reduction)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Hard-label cross-entropy ``−log softmax(z)_y`` (no temperature: Hinton's hard term uses T = 1).

    ``logits``: (..., C); ``labels``: (...) integer class ids, ``IGNORE_INDEX`` (-100) where there is
    no label (those positions are masked out, as if ``mask`` were False there). ``mask``: (...) or None.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match the logits' leading axes {tuple(logits.shape[:-1])}")
    labelled = labels != IGNORE_INDEX
    mask = labelled if mask is None else mask.bool() & labelled
    log_p = torch.log_softmax(upcast(logits), dim=-1)
    nll = -log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return reduce(nll, mask, reduction)


def hinton_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """``α · CE(y, softmax(z_s)) + (1 − α) · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``.

    ``student_logits``, ``teacher_logits``: (..., C); ``labels``: (...); ``mask``: (...) or None.
    ``alpha = 1`` is plain hard-label training (``teacher_logits`` may then be None); ``alpha = 0`` is soft
    targets only.
    Positions without a label (``IGNORE_INDEX``) are left out of both terms, so that the two are
    averaged over the same positions.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    labelled = labels != IGNORE_INDEX
    mask = labelled if mask is None else mask.bool() & labelled
    hard = cross_entropy(student_logits, labels, mask, reduction)
    if alpha == 1.0:  # skip the teacher entirely: a hard-label student needs no teacher logits
        return hard
    if teacher_logits is None:
        raise ValueError(f"alpha = {alpha} < 1 mixes in soft targets: pass the teacher's logits")
    return alpha * hard + (1.0 - alpha) * kd_kl(student_logits, teacher_logits, temperature, mask, reduction)


def kept(teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The teacher's values (...) or (..., C) with 0 at the positions ``mask`` (...) drops: what a padded position
    holds (NaN, ±inf, an id past the vocabulary) then reaches neither the loss nor, through ``reduce``'s
    ``torch.where``, its gradient (0 · NaN is NaN there). The student's logits are the model's own and not filled."""
    if mask is None:
        return teacher
    if teacher.shape[: mask.dim()] != mask.shape:
        raise ValueError(
            f"mask {tuple(mask.shape)} must have the positions' shape {tuple(teacher.shape[: mask.dim()])}"
        )
    at = mask.bool().reshape(*mask.shape, *[1] * (teacher.dim() - mask.dim()))
    return torch.where(at, teacher, torch.zeros((), dtype=teacher.dtype, device=teacher.device))


def reduce(values: torch.Tensor, mask: torch.Tensor | None, reduction: Reduction) -> torch.Tensor:
    """Combine per-position ``values`` (...) over the positions ``mask`` (...) keeps (see the module doc)."""
    if mask is not None:
        if mask.shape != values.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the positions' shape {tuple(values.shape)}")
        values = torch.where(mask.bool(), values, torch.zeros_like(values))
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        kept = values.numel() if mask is None else mask.sum()
        # an all-masked batch contributes 0, not NaN
        return values.sum() / torch.clamp(torch.as_tensor(kept, dtype=values.dtype), min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for the softmax and the divergence (bf16/fp16 logits lose digits there); float64 stays
    float64, so that the float64 tests check the math rather than float32 rounding."""
    return x if x.dtype == torch.float64 else x.float()


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
