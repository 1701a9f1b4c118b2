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

from typing import Literal

import torch

Reduction = Literal["mean", "sum", "none"]
IGNORE_INDEX = -100  # the label value transformers and TRL use for "no label at this position"


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(z / T)`` over the last axis. ``logits``: (..., C) -> probabilities (..., C)."""
    _check_temperature(temperature)
    return torch.softmax(logits.float() / temperature, dim=-1)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
          mask: torch.Tensor | None = None, reduction: Reduction = "mean") -> torch.Tensor:
    """Forward KL at temperature T, scaled by T²:  ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``.

    ``student_logits``, ``teacher_logits``: (..., C), teacher as logits or log-probs (may hold ``-inf``
    for classes it gives no mass, e.g. outside a cached top-k: those terms are 0, not NaN).
    ``mask``: (...) bool or None. Returns a scalar, or (...) for ``reduction="none"``.

    Per position: ``T² · Σ_c p_t,c (log p_t,c − log p_s,c)`` with ``p = softmax(z / T)``; 0 when the two
    distributions are equal, and ≥ 0 always.
    """
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (..., C)")
    log_ps = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    pt = log_pt.exp()
    # where p_t = 0 the term is 0 by the limit x·log x -> 0; computing it would give 0·(-inf) = NaN.
    per_class = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt))
    return reduce(temperature**2 * per_class.sum(dim=-1), mask, reduction)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                  reduction: Reduction = "mean") -> torch.Tensor:
    """Hard-label cross-entropy ``−log softmax(z)_y`` (no temperature: Hinton's hard term uses T = 1).

    ``logits``: (..., C); ``labels``: (...) integer class ids, ``IGNORE_INDEX`` (-100) where there is
    no label (those positions are masked out, as if ``mask`` were False there). ``mask``: (...) or None.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match the logits' leading axes {tuple(logits.shape[:-1])}")
    labelled = labels != IGNORE_INDEX
    mask = labelled if mask is None else mask.bool() & labelled
    log_p = torch.log_softmax(logits.float(), dim=-1)
    nll = -log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return reduce(nll, mask, reduction)


def hinton_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                alpha: float, temperature: float, mask: torch.Tensor | None = None,
                reduction: Reduction = "mean") -> torch.Tensor:
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


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
