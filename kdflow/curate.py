"""Filtering teacher answers. A dropped row is data: it keeps its raw text and the reason(s) it was dropped."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

# Reason codes (stable strings: they end up in drops datasets and reports).
TRUNCATED = "truncated"  # the teacher hit max_new_tokens before ending its answer
NO_FINAL_ANSWER = "no_final_answer"  # no final answer could be extracted
WRONG_ANSWER = "wrong_answer"  # the final answer differs from the gold one


def drop_reasons(row: dict, check: Callable[[str, str], bool], extract: Callable[[str], object]) -> list[str]:
    """Why ``row`` (a teacher answer with ``text``, ``finish_reason`` and gold ``answer``) is not kept."""
    reasons = []
    if row["finish_reason"] == "length":
        reasons.append(TRUNCATED)
    if extract(row["text"]) is None:
        reasons.append(NO_FINAL_ANSWER)
    elif not check(row["text"], row["answer"]):
        reasons.append(WRONG_ANSWER)
    return reasons


def filter_by_correctness(rows: list[dict], check, extract) -> tuple[list[dict], list[dict]]:
    """Split rows into (kept, dropped); each dropped row gains ``reasons``. kept + dropped == rows."""
    kept, dropped = [], []
    for row in rows:
        reasons = drop_reasons(row, check, extract)
        if reasons:
            dropped.append({**row, "reasons": reasons})
        else:
            kept.append(row)
    assert len(kept) + len(dropped) == len(rows)
    return kept, dropped


def reason_counts(dropped: list[dict]) -> dict[str, int]:
    return dict(Counter(reason for row in dropped for reason in row["reasons"]))
