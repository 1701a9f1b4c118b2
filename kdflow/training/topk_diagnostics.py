"""What a top-k teacher's loss leaves out, made visible per logging step (issue 26, part 5).

A student trained on a teacher's top-k (offline KD from the logit cache, on-policy KD on the teacher's top-k scores)
sees the teacher's k ids and one tail bucket for every other id (``losses.sparse_kd_loss``). Top-k losses are
contested — verl #7856 found a truncated forward KL clamped to 0 in 89 % of steps; arXiv 2605.11182 shows top-k
reverse-KL gradients are biased — so each KD trainer logs, per micro-batch and averaged per logging step by TRL:

- ``topk_kept_mass``: the teacher's mass on its top-k ids, Σ top-k p at T = 1, mean over the KD positions;
- ``topk_tail_mass``: the rest, 1 − kept: what the loss sees only as one bucket;
- ``top1_outside_topk``: the share of KD positions whose student top-1 id is not among the teacher's top-k ids
  (there the loss knows nothing of where the student's mass sits, only that it is in the tail);
- ``kd_ce_ratio``: the KD term over the CE term, ``kd_loss / ce_loss`` of the logging window's means (both are
  logged already), before α weights them.

All from tensors the loss has already computed, under ``torch.no_grad``: the teacher's k + 1 buckets (small), the
student's argmax over the logits already there (on the chunked path, per chunk, from the maxima its logsumexps find
anyway: no extra pass over the vocabulary). The training is unchanged.
"""

from __future__ import annotations

import torch

from kdflow.training.losses import reduce, teacher_buckets

KEPT, TAIL, OUTSIDE, RATIO = "topk_kept_mass", "topk_tail_mass", "top1_outside_topk", "kd_ce_ratio"
PER_POSITION = (KEPT, TAIL, OUTSIDE)  # means over a micro-batch's KD positions
LOGGED = (*PER_POSITION, "ce_loss", "kd_loss", RATIO)  # what a logging step carries, and the summary keeps


def teacher_mass(logprobs: torch.Tensor, tail: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's kept and tail mass (...), each from its cached top-k log-probs (..., k) and tail log-mass
    (...) at T = 1, normalised as the loss's buckets are (``losses.teacher_buckets``): they sum to 1."""
    p = teacher_buckets(logprobs, tail, vocab_size, 1.0).exp()
    return p[..., :-1].sum(-1), p[..., -1]


def outside_topk(student_top1: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """True where the student's top-1 id (...) is none of the teacher's top-k ids (..., k)."""
    return ~(ids == student_top1.unsqueeze(-1)).any(-1)


@torch.no_grad()
def position_means(
    logprobs: torch.Tensor, tail: torch.Tensor, outside: torch.Tensor, vocab_size: int, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """``{topk_kept_mass, topk_tail_mass, top1_outside_topk}``: means over the positions ``mask`` (N,) keeps (all
    when None; 0 when none, as ``reduce`` gives) of the rows ``logprobs`` (N, k), ``tail`` (N,) and ``outside`` (N,)
    (``outside_topk``, or the chunked head's ``Teacher.student_outside``). One host sync for the three."""
    kept, rest = teacher_mass(logprobs, tail, vocab_size)
    values = torch.stack([reduce(x, mask, "mean") for x in (kept, rest, outside.to(kept.dtype))]).tolist()
    return dict(zip(PER_POSITION, values))


def ratio(kd: float, ce: float) -> float | None:
    """``kd / ce``; None where the CE term is 0 (nothing to compare with)."""
    return kd / ce if ce > 0 else None


def window_ratio(metrics: dict[str, list[float]]) -> dict[str, float]:
    """``{kd_ce_ratio}`` of a logging window's ``ce_loss`` and ``kd_loss`` values (the trainer's ``_metrics``), from
    their means as the log shows them; {} where the window has no KD term."""
    ce, kd = metrics.get("ce_loss"), metrics.get("kd_loss")
    if not ce or not kd:
        return {}
    r = ratio(sum(kd) / len(kd), sum(ce) / len(ce))
    return {} if r is None else {RATIO: r}


def of(logs: dict) -> dict[str, float]:
    """The diagnostics in a log entry (a logging step of the log history); {} for a student without top-k."""
    return {k: logs[k] for k in LOGGED if k in logs} if KEPT in logs else {}


def brief(d: dict) -> str:
    """One logging step's diagnostics for a progress line: ``kept 0.972  tail 0.028  top-1 outside 4.1%  kd/ce 0.21``;
    '' without them."""
    if KEPT not in d:
        return ""
    text = f"kept {d[KEPT]:.3f}  tail {d[TAIL]:.3f}  top-1 outside {d[OUTSIDE]:.1%}"
    return text + (f"  kd/ce {d[RATIO]:.3g}" if d.get(RATIO) is not None else "")


def summary(history: list[dict], alpha: float | None = None) -> dict:
    """A student's top-k diagnostics over its training, for its manifest: ``mean`` (over the logging steps; the
    ratio is that of the mean KD and CE terms), ``first`` and ``last`` (the first and last logging windows, with
    their ``step``), ``logging_steps``, and ``alpha`` (the CE term's weight, 0 for on-policy KD); {} when the log
    history holds none (a student without a top-k teacher)."""
    steps = [(h["step"], of(h)) for h in history if of(h)]
    if not steps:
        return {}
    mean = {k: _mean([d[k] for _, d in steps if d.get(k) is not None]) for k in (*PER_POSITION, "ce_loss", "kd_loss")}
    mean = {k: v for k, v in mean.items() if v is not None}
    if "ce_loss" in mean and "kd_loss" in mean and (r := ratio(mean["kd_loss"], mean["ce_loss"])) is not None:
        mean[RATIO] = r
    window = lambda step, d: {"step": step, **{k: round(v, 6) for k, v in d.items() if v is not None}}  # noqa: E731
    return {
        "logging_steps": len(steps),
        **({} if alpha is None else {"alpha": alpha}),
        "mean": {k: round(v, 6) for k, v in mean.items()},
        "first": window(*steps[0]),
        "last": window(*steps[-1]),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
