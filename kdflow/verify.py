"""Final-answer verification for free-form and GSM8K-style answers, and self-consistency over n samples.

Equivalence is math-verify's (HF's maintained verifier: numbers, LaTeX, units and currency, ``\\boxed{}``),
not a lone regex: ``72``, ``72.0``, ``$72``, ``72 dollars`` and ``\\boxed{72}`` are one answer. What we add
is *where* the final answer is: GSM8K ends its solutions with ``#### 72``, many prompts ask for
``Answer: 72``, so the text after the last such marker is the answer when there is one; calculator
annotations ``<<48/2=24>>`` are removed first, since their numbers are intermediate results.

The arithmetic demo keeps its own exact checker (``data.arithmetic``); this path is for everything else.
"""

from __future__ import annotations

import enum
import re
import threading
from collections.abc import Callable

from math_verify import parse, verify

from kdflow.recipe import SelectPolicy as Policy

CALCULATOR_RE = re.compile(r"<<[^<>]*>>")
# The last final-answer marker; what follows it (to the end of its line) is the answer.
MARKER_RE = re.compile(r"(?:####|\bAnswer\s*:|\bfinal answer is\b|\banswer is\b)\s*(.*)", re.IGNORECASE)
TIMEOUT_S = 5


class Verdict(str, enum.Enum):
    correct = "correct"
    wrong = "wrong"
    no_answer = "no_answer"  # no final answer could be extracted from the text


def _timeout() -> int | None:
    # math-verify's timeout uses SIGALRM, which Python only allows in the main thread (Prefect runs tasks in
    # worker threads); there we go without, as sympy on a single extracted answer is bounded in practice.
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def answer_span(text: str) -> str:
    """The part of ``text`` that holds the final answer: after the last marker, else the whole text."""
    text = CALCULATOR_RE.sub("", text)
    spans = [m.group(1) for m in MARKER_RE.finditer(text) if m.group(1).strip()]
    return spans[-1] if spans else text


def extract(text: str) -> list:
    """math-verify's parse of the final answer (a list of sympy / string forms); [] when there is none."""
    if not text or not text.strip():
        return []
    return parse(answer_span(text), parsing_timeout=_timeout())


def final_answer(text: str) -> str | None:
    """The final answer as a string (math-verify's normalised form), or None when there is none."""
    parsed = extract(text)
    return str(parsed[-1]) if parsed else None


def equivalent(a: list, b: list) -> bool:
    return bool(a) and bool(b) and verify(a, b, timeout_seconds=_timeout())


def judge(text: str, gold: str) -> Verdict:
    got = extract(text)
    if not got:
        return Verdict.no_answer
    return Verdict.correct if equivalent(extract(str(gold)), got) else Verdict.wrong


def check_answer(text: str, gold) -> bool:
    return judge(text, str(gold)) is Verdict.correct


# ---- self-consistency -----------------------------------------------------------------------------------


def select(samples: list[dict], policy: Policy, k: int = 1, length: Callable[[dict], int] = lambda r: len(r["text"])) -> list[int]:
    """Indices (into ``samples``) of the samples one prompt keeps under ``policy``; all of ``samples`` qualify.
    Shorter wins because, among equally correct rationales, the short one is the cheaper thing to imitate."""
    order = sorted(range(len(samples)), key=lambda i: (length(samples[i]), i))
    if policy is Policy.all:
        return order
    if policy is Policy.shortest:
        return order[:1]
    chosen, seen = [], set()
    for i in order:
        if samples[i]["text"] not in seen and len(chosen) < k:
            chosen.append(i)
            seen.add(samples[i]["text"])
    return chosen


def majority(texts: list[str], check: Callable[[str, object], bool], extract: Callable[[str], object]) -> int | None:
    """The index of one text of the strict-plurality answer class, or None (no answers, or a tie). Two texts
    vote together when ``check`` accepts one against the other's extracted answer, so with this module's
    ``check_answer`` ``72`` and ``72.0`` are one vote class, and with the demo's exact checker equal integers are."""
    classes: list[tuple[object, list[int]]] = []  # (the first member's answer, members)
    for i, text in enumerate(texts):
        answer = extract(text)
        if answer is None:
            continue
        for first, members in classes:
            if check(text, first):
                members.append(i)
                break
        else:
            classes.append((answer, [i]))
    sizes = sorted((len(members) for _, members in classes), reverse=True)
    if not sizes or (len(sizes) > 1 and sizes[0] == sizes[1]):
        return None
    return next(members[0] for _, members in classes if len(members) == sizes[0])
