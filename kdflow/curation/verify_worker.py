"""The half of ``kdflow.curation.verify`` that runs math-verify, in a process of its own that the caller kills when one
answer takes too long. Run as ``python -m kdflow.curation.verify_worker``: it reads one JSON line per batch on stdin,
``{"timeout": seconds, "calls": [[op, [args...]], ...]}``, and writes one JSON line per call on stdout, in
order, ``{"ok": result}`` (or ``{"error": message}`` for a bug). End of stdin ends it.

Why a process: math-verify's own timeout is SIGALRM, which Python allows only in the main thread (Prefect and
Dask run tasks in worker threads, where it is off), and no Python-level timeout interrupts a big-integer power
computed in C: ``9^9^9^9`` never returns. Only killing the process bounds it. This module imports nothing but
math-verify, so a worker starts in about a second.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import signal
import sys

CALCULATOR_RE = re.compile(r"<<[^<>]*>>")
# The last final-answer marker; what follows it (to the end of its line) is the answer.
MARKER_RE = re.compile(r"(?:####|\bAnswer\s*:|\bfinal answer is\b|\banswer is\b)\s*(.*)", re.IGNORECASE)
CORRECT, WRONG, NO_ANSWER = "correct", "wrong", "no_answer"  # kdflow.curation.verify.Verdict's values
# A number in e-notation standing alone (2e5, 1.5E-3; not 3eggs, not x1e5): math-verify reads only its mantissa, so
# '#### 1e10' matched a gold 1 and '#### 2e5' missed a gold 200000. Written as m*10^(e), it reads the whole number.
E_NUMBER_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)[eE]([-+]?\d+)(?![\w.])")
MAX_EXPONENT = 1000  # beyond it no answer is meant (and 10^e itself costs time): the number is read as no answer
PARSE_CACHE = 16_384  # parsed answers kept: curation parses the same text (extract, then check) and gold repeats


def answer_span(text: str) -> str:
    """The part of ``text`` that holds the final answer: after the last marker, else the whole text."""
    text = CALCULATOR_RE.sub("", text)
    spans = [m.group(1) for m in MARKER_RE.finditer(text) if m.group(1).strip()]
    return E_NUMBER_RE.sub(_power_of_ten, spans[-1] if spans else text)


def _power_of_ten(match: re.Match) -> str:
    mantissa, exponent = match.groups()
    return f"({mantissa}*10^({int(exponent)}))" if abs(int(exponent)) <= MAX_EXPONENT else "(a number out of range)"


@functools.lru_cache(maxsize=PARSE_CACHE)
def _parse(span: str) -> tuple:
    from math_verify import parse

    # No timeout of math-verify's own: it would turn a slow answer into "no answer" silently. The caller's
    # kill is the bound, and it is reported as a timeout.
    return tuple(parse(span, parsing_timeout=None))


def extract(text: str) -> list:
    """math-verify's parse of the final answer (a list of sympy / string forms); [] when there is none."""
    if not text or not text.strip():
        return []
    return list(_parse(answer_span(text)))


def final_answer(text: str) -> str | None:
    parsed = extract(text)
    return str(parsed[-1]) if parsed else None


def judge(text: str, gold: str) -> str:
    from math_verify import verify

    got = extract(text)
    if not got:
        return NO_ANSWER
    expected = extract(gold)
    return CORRECT if expected and verify(expected, got, timeout_seconds=None) else WRONG


OPS = {"final_answer": final_answer, "judge": judge}


class _NoTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeout is off; here that is the point (the caller bounds each call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


def serve(requests, replies) -> None:
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_NoTimeoutWarning())
    # A backstop if the caller is gone (killed while we compute): SIGALRM's default action ends this process,
    # even inside a C computation that never returns to Python. The caller kills us well before it fires.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    reply = lambda message: (replies.write(json.dumps(message).encode() + b"\n"), replies.flush())  # noqa: E731
    reply({"ok": "ready"})
    for line in requests:
        batch = json.loads(line)
        for op, args in batch["calls"]:
            signal.setitimer(signal.ITIMER_REAL, 2 * batch["timeout"] + 5)
            try:
                result = {"ok": OPS[op](*args)}
            except Exception as e:  # a bug, not an answer: the caller raises it with the answer it was checking
                result = {"error": f"{type(e).__name__}: {e}"}
            signal.setitimer(signal.ITIMER_REAL, 0)
            reply(result)


def main() -> None:
    # The replies go to a private copy of stdout; fd 1 becomes stderr, so a library that prints cannot
    # corrupt them.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    import math_verify  # noqa: F401  (imported before "ready": the caller's timeout covers answers, not imports)

    try:
        serve(sys.stdin.buffer, replies)
    except BrokenPipeError:  # the caller went away without closing our stdin first: nothing left to answer
        pass


if __name__ == "__main__":
    main()
