"""CE and top-k KD straight from the student's final hidden states, over chunks of positions, so that the
(positions × V) logits never exist at once: at V = 151,936 they, their fp32 copy, the log-softmax and its
scattered copy are what dominates a KD step's memory (kdflow.training.losses builds all four).

Per chunk of rows the forward computes the logits through the LM head, their logsumexp, the gather at the
label and at the teacher's top-k, the logsumexp of the rest, and the divergence over the k + 1 buckets; it keeps
per row only three numbers (two logsumexps, the rest) and the divergence's gradient with respect to the k + 1
bucket log-probs. The backward recomputes each chunk's logits and turns them into the logits' gradient in closed
form (below), then into the hidden states' gradient (a GEMM in the head's dtype, as autograd computes it for bf16
logits) and the head's (accumulated over chunks in fp32). Peak memory: three chunk-sized fp32 buffers reused by
every chunk (``chunk_rows``; 64 MiB each at V = 151,936), whatever the number of positions.

The values are those of ``losses.cross_entropy`` and ``losses.sparse_kd_loss`` on ``hidden @ weight.T + bias``,
for every divergence and temperature (the divergence itself is the same function, differentiated on the small
bucket tensor only); tests/training/test_chunked_loss.py checks values and gradients against them. Like Liger-Kernel's
fused linear losses and TRL's chunked log-probs (trl.kernels.chunked_logprob), only rows that carry a loss should
be passed in: select the answer positions before the head.

Gradient of the student's buckets, with ``z = logits / T``, ``P = softmax(z)``, ``lse = logsumexp(z)``, bucket
log-probs ``top_j = z[id_j] − lse`` and ``rest = logsumexp(z over ids ∉ top-k) − lse``, and ``g = ∂D/∂(top, rest)``:

    ∂D/∂z_v = Σ_j g_top,j [v = id_j]  +  g_rest · [v ∉ top-k] · exp(z_v − lse − rest)  −  (Σ g) · P_v

and ``∂/∂logits = ∂/∂z / T`` (a top-k holding every id has no rest: its term and its share of ``Σ g`` drop).
Cross-entropy adds ``P¹ − onehot(label)`` (``P¹`` the softmax at T = 1).
"""

from __future__ import annotations

import torch

from kdflow.config.kd import Divergence
from kdflow.training.losses import IGNORE_INDEX, Reduction, divergence, reduce, teacher_buckets, upcast

# Logit elements per chunk: 2**24 is 64 MiB per fp32 copy; at V = 151,936 that is 110 rows.
CHUNK_ELEMENTS = 2**24


def chunk_rows(vocab_size: int, elements: int | None = None) -> int:
    """How many rows of (rows × ``vocab_size``) logits make one chunk of about ``elements`` values."""
    return max(1, (elements or CHUNK_ELEMENTS) // vocab_size)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``losses.cross_entropy(hidden @ weight.T + bias, labels)`` without the full logits.

    ``hidden``: (N, H) final hidden states; ``weight``: (V, H) the LM head; ``bias``: (V,) or None; ``labels``:
    (N,) ids, ``IGNORE_INDEX`` where none. Returns a scalar, or (N,) for ``reduction="none"``.
    """
    ce, _ = head_losses(hidden, weight, bias, labels=labels, chunk_size=chunk_size)
    return reduce(ce, labels != IGNORE_INDEX, reduction)


def chunked_sparse_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail: torch.Tensor,
    kind: Divergence = Divergence.forward_kl,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.5,
    skew: float = 0.1,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``losses.sparse_kd_loss(hidden @ weight.T + bias, ids, logprobs, tail, ...)`` without the full logits.

    ``hidden``: (N, H); ``weight``: (V, H); ``bias``: (V,) or None; ``ids``, ``logprobs``: (N, k) the teacher's
    top-k at T = 1; ``tail``: (N,) its log tail mass; ``mask``: (N,) or None.
    """
    kd = Teacher(ids, logprobs, tail, kind, temperature, beta, skew)
    _, per_row = head_losses(hidden, weight, bias, teacher=kd, chunk_size=chunk_size)
    return reduce(per_row, mask, reduction)


class Teacher:
    """The KD term's inputs for ``head_losses``: a cached top-k teacher (N rows) and the divergence's settings.

    ``student_outside``: (N,) bool, True where the student's top-1 id is none of these top-k ids (a tie counts as
    inside), filled in by ``head_losses`` from the maxima its chunks find anyway (for
    ``kdflow.training.topk_diagnostics``); None before."""

    def __init__(
        self,
        ids: torch.Tensor,
        logprobs: torch.Tensor,
        tail: torch.Tensor,
        kind: Divergence = Divergence.forward_kl,
        temperature: float = 1.0,
        beta: float = 0.5,
        skew: float = 0.1,
    ):
        self.ids, self.logprobs, self.tail = ids.long(), logprobs, tail
        self.kind, self.temperature, self.beta, self.skew = Divergence(kind), temperature, beta, skew
        self.student_outside: torch.Tensor | None = None


def head_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    teacher: Teacher | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-row CE and ``T² · D(teacher ‖ student)`` of ``hidden @ weight.T + bias``, sharing one pass over the head.

    ``hidden``: (N, H); ``weight``: (V, H); ``bias``: (V,) or None; ``labels``: (N,) or None (no CE; 0 where
    ``IGNORE_INDEX``); ``teacher``: N rows or None (no KD). Returns ``(ce, kd)``, each (N,) fp32 (fp64 for fp64
    inputs) or None. ``chunk_size``: rows per chunk, default ``chunk_rows(V)``. With a teacher, sets its
    ``student_outside``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be (N, H) and weight {tuple(weight.shape)} (V, H)")
    n, vocab = hidden.shape[0], weight.shape[0]
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels {tuple(labels.shape)} must be ({n},), one per row of hidden")
    p = ids = None
    settings = (1.0, Divergence.forward_kl, 0.5, 0.1)
    if teacher is not None:
        if teacher.ids.shape[0] != n or teacher.tail.shape != (n,):
            raise ValueError(
                f"teacher ids {tuple(teacher.ids.shape)} and tail {tuple(teacher.tail.shape)} must have "
                f"{n} rows, one per row of hidden"
            )
        # the teacher's k + 1 buckets do not depend on the student: computed once, outside the chunks
        p = teacher_buckets(teacher.logprobs, teacher.tail, vocab, teacher.temperature)
        ids = teacher.ids
        settings = (teacher.temperature, teacher.kind, teacher.beta, teacher.skew)
    ce, kd, outside = _HeadLosses.apply(hidden, weight, bias, labels, ids, p, settings, chunk_size or chunk_rows(vocab))
    if teacher is not None:
        teacher.student_outside = outside
    return ce, kd


class _Buffers:
    """One chunk's worth of scratch space, reused by every chunk: ops in place into these buffers instead of a
    fresh (rows × V) tensor per op. On a CPU a fresh buffer this size is mapped and page-faulted anew each time
    (larger than malloc's reuse threshold), which cost 10-20x the arithmetic in a measurement at V = 151,936."""

    def __init__(self, rows: int, weight: torch.Tensor, count: int):
        vocab, self.weight = weight.shape[0], weight
        acc = upcast(weight.new_empty(0)).dtype
        self.fp = [torch.empty(rows, vocab, dtype=acc, device=weight.device) for _ in range(count)]
        # the head's own dtype, for its matmuls (bf16 GEMMs are several times faster than fp32 on a CPU)
        self.low = None if weight.dtype == acc else torch.empty(rows, vocab, dtype=weight.dtype, device=weight.device)

    def logits(self, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The chunk's logits in the model's dtype (as its own head computes them), upcast into ``fp[0]``."""
        n = hidden.shape[0]
        out = self.fp[0][:n] if self.low is None else self.low[:n]
        torch.mm(hidden, self.weight.t(), out=out)
        if bias is not None:
            out.add_(bias)
        return out if self.low is None else self.fp[0][:n].copy_(out)

    def grad_hidden(self, dz: torch.Tensor) -> torch.Tensor:
        """``dz @ weight`` in the head's dtype, as autograd computes it for the dense head's bf16 logits."""
        if self.low is None:
            return dz @ self.weight
        return self.low[: dz.shape[0]].copy_(dz) @ self.weight


def _logsumexp(z: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``logsumexp(z, -1)`` (rows,) through ``scratch`` (rows, V) instead of a fresh buffer; rows of -inf give -inf."""
    return _logsumexp_and_max(z, scratch)[0]


def _logsumexp_and_max(z: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_logsumexp`` and the rows' maximum (rows,), which it finds anyway."""
    peak = z.amax(-1, keepdim=True)
    top = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)  # an all -inf row: exp(-inf - 0) = 0, not NaN
    return torch.sub(z, top, out=scratch).exp_().sum(-1).log_() + top.squeeze(-1), peak.squeeze(-1)


class _HeadLosses(torch.autograd.Function):
    """Forward: per-row CE and KD over chunks of rows. Backward: each chunk's logits again, their gradient in
    closed form (module docstring), and the gradients of hidden, weight and bias accumulated in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ids, p, settings, chunk):
        temperature, kind, beta, skew = settings
        n = hidden.shape[0]
        buf = _Buffers(min(chunk, n), weight, 2)
        acc = buf.fp[0].dtype
        ce = hidden.new_zeros(n, dtype=acc) if labels is not None else None
        kd = hidden.new_zeros(n, dtype=acc) if p is not None else None
        lse1 = hidden.new_zeros(n, dtype=acc)
        lse_t, rest = hidden.new_zeros(n, dtype=acc), hidden.new_zeros(n, dtype=acc)
        grad_q = hidden.new_zeros((n, p.shape[1]), dtype=acc) if p is not None else None
        outside = hidden.new_zeros(n, dtype=torch.bool) if p is not None else None  # diagnostics only, not used
        for s in range(0, n, chunk):
            rows = slice(s, min(s + chunk, n))
            z, scratch = buf.logits(hidden[rows], bias), buf.fp[1][: rows.stop - s]
            lse1[rows] = _logsumexp(z, scratch)
            if labels is not None:
                y = labels[rows]
                nll = lse1[rows] - z.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                ce[rows] = torch.where(y != IGNORE_INDEX, nll, torch.zeros_like(nll))
            if p is not None:
                zt = z if temperature == 1.0 else z.div_(temperature)
                lse_t[rows] = lse1[rows] if temperature == 1.0 else _logsumexp(zt, scratch)
                picked = zt.gather(-1, ids[rows])
                top = picked - lse_t[rows, None]
                rest_lse, rest_max = _logsumexp_and_max(zt.scatter_(-1, ids[rows], float("-inf")), scratch)
                rest[rows] = rest_lse - lse_t[rows]
                # the student's top-1 is outside the top-k when the rest's best logit beats theirs (no extra pass)
                outside[rows] = rest_max > picked.amax(-1)
                q = torch.cat([top, rest[rows, None]], dim=-1)
                kd[rows], grad_q[rows] = _divergence_and_grad(p[rows], q, kind, temperature, beta, skew)
        ctx.save_for_backward(hidden, weight, bias, labels, ids, lse1, lse_t, rest, grad_q)
        ctx.temperature, ctx.chunk = temperature, chunk
        if outside is not None:
            ctx.mark_non_differentiable(outside)
        return ce, kd, outside

    @staticmethod
    def backward(ctx, grad_ce, grad_kd, grad_outside=None):
        hidden, weight, bias, labels, ids, lse1, lse_t, rest, grad_q = ctx.saved_tensors
        temperature, chunk, n = ctx.temperature, ctx.chunk, hidden.shape[0]
        buf = _Buffers(min(chunk, n), weight, 3)
        acc = lse1.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        use_ce = labels is not None and grad_ce is not None
        use_kd = ids is not None and grad_kd is not None
        for s in range(0, n, chunk):
            rows = slice(s, min(s + chunk, n))
            z = buf.logits(hidden[rows], bias)
            dz = buf.fp[1][: z.shape[0]].zero_()
            if use_ce:  # g · (softmax(z) − onehot(y)), 0 where there is no label
                g = torch.where(
                    labels[rows] != IGNORE_INDEX, grad_ce[rows].to(acc), torch.zeros((), dtype=acc, device=z.device)
                )
                torch.sub(z, lse1[rows, None], out=dz).exp_().mul_(g[:, None])
                dz.scatter_add_(-1, labels[rows].clamp(min=0).unsqueeze(-1), -g.unsqueeze(-1))
            if use_kd:
                # A row whose KD value is not used (masked out by ``reduce``: upstream gradient 0) passes 0 on, not
                # 0 · its divergence's gradient, which is NaN where that row's teacher holds a NaN.
                g = grad_kd[rows, None].to(acc)
                g = torch.where(g == 0, torch.zeros((), dtype=acc, device=g.device), grad_q[rows] * g)
                dz += _bucket_grad(z, ids[rows], lse_t[rows], rest[rows], g, temperature, buf.fp[2][: z.shape[0]])
            h = hidden[rows]
            if need_h:
                grad_h[rows] = buf.grad_hidden(dz)
            if need_w:
                grad_w.addmm_(dz.t(), upcast(h))
            if need_b:
                grad_b += dz.sum(0)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return cast(grad_h, hidden), cast(grad_w, weight), cast(grad_b, bias), None, None, None, None, None


def _divergence_and_grad(p, q, kind, temperature, beta, skew):
    """Per-row ``T² · D(p ‖ q)`` (rows,) and its gradient with respect to the bucket log-probs ``q`` (rows, k + 1):
    ``losses.divergence`` itself, differentiated by autograd on this small tensor only."""
    with torch.enable_grad():
        q = q.detach().requires_grad_(True)
        d = temperature**2 * divergence(p, q, kind, beta, skew)
        (grad,) = torch.autograd.grad(d.sum(), q)
    return d.detach(), grad


def _bucket_grad(z, ids, lse_t, rest, g, temperature, out):
    """``∂/∂logits`` of the KD term for one chunk (module docstring), written into ``out`` (rows, V); ``z`` (rows,
    V) the logits at T = 1 (divided by T in place), ``g`` (rows, k + 1) the upstream gradient with respect to the
    student's bucket log-probs."""
    zt = z if temperature == 1.0 else z.div_(temperature)
    g_top, g_rest = g[:, :-1], g[:, -1:]
    # A top-k holding every id leaves the rest empty (rest = -inf): it then has no gradient to pass on, as in the
    # dense loss, whatever the divergence's gradient there (reverse KL's is NaN at q = p = 0).
    g_rest = torch.where(torch.isinf(rest[:, None]), torch.zeros_like(g_rest), g_rest)
    # the rest's softmax, 0 at the top-k ids (zeroed before the product: exp can be inf there when rest is -inf)
    torch.sub(zt, (lse_t + rest)[:, None], out=out).exp_().scatter_(-1, ids, 0.0).mul_(g_rest)
    out -= zt.sub_(lse_t[:, None]).exp_().mul_(g_top.sum(-1, keepdim=True) + g_rest)  # zt is spent from here
    out.scatter_add_(-1, ids, g_top)
    return out if temperature == 1.0 else out.div_(temperature)
