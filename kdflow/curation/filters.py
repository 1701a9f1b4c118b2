"""The generic filters on teacher answers, each a small pure function that says why a row goes, and the reason
codes they write. A row is a dict with at least ``text`` (the teacher's answer) and ``finish_reason``."""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

from kdflow.curation.dedup import exact_duplicates, near_duplicates


class Reason(str, enum.Enum):
    """Why a row was dropped; the values are stable strings (they end up in drops datasets and reports)."""

    truncated = "truncated"  # the teacher hit its token limit (finish_reason == "length")
    empty_answer = "empty_answer"  # nothing but whitespace
    no_final_answer = "no_final_answer"  # no final answer could be extracted
    wrong_answer = "wrong_answer"  # the final answer differs from the gold one
    verify_timeout = "verify_timeout"  # math-verify gave no verdict within kdflow.curation.verify.TIMEOUT_S (9^9^9^9)
    too_short = "too_short"  # fewer tokens (student's tokenizer) than length.min_tokens
    too_long = "too_long"  # more than length.max_tokens
    refusal = "refusal"  # matches a refusal pattern ("I can't help with that")
    format_mismatch = "format_mismatch"  # does not match the required format pattern
    minority_answer = "minority_answer"  # self-consistency without gold: not the majority answer
    no_majority = "no_majority"  # self-consistency without gold: the samples' answers tie
    not_selected = "not_selected"  # self-consistency: a good sample the policy did not pick (shortest, best k)
    duplicate = "duplicate"  # the same text as an earlier kept row (case, punctuation, spacing aside)
    near_duplicate = "near_duplicate"  # MinHash Jaccard >= dedup.threshold with an earlier kept row
    judge_low_score = "judge_low_score"  # the LLM judge scored it below judge.threshold
    judge_unparsed = "judge_unparsed"  # the judge's reply had no score line
    no_instruction = "no_instruction"  # self-instruct: the teacher's reply held no numbered or bulleted line
    near_seed = "near_seed"  # self-instruct: a new instruction too close to a seed instruction


def length_reasons(tokens: int, min_tokens: int, max_tokens: int | None) -> list[Reason]:
    if tokens < min_tokens:
        return [Reason.too_short]
    if max_tokens is not None and tokens > max_tokens:
        return [Reason.too_long]
    return []


def pattern_reasons(text: str, refusals: list[re.Pattern], required: re.Pattern | None) -> list[Reason]:
    reasons = []
    if any(p.search(text) for p in refusals):
        reasons.append(Reason.refusal)
    if required is not None and not required.search(text):
        reasons.append(Reason.format_mismatch)
    return reasons


def correctness_reasons(
    text: str, gold, check: Callable[[str, object], bool], extract: Callable[[str], object]
) -> list[Reason]:
    if extract(text) is None:
        return [Reason.no_final_answer]
    return [] if check(text, gold) else [Reason.wrong_answer]


def duplicate_reasons(
    keys: list[str], exact: bool, near: bool, threshold: float, ngram: int, num_perm: int
) -> list[tuple[Reason, int] | None]:
    """For each key, (reason, index of the earlier kept key it duplicates) or None. Exact copies are found
    first (cheap, certain); only the remaining texts go through MinHash."""
    out: list[tuple[Reason, int] | None] = [None] * len(keys)
    if exact:
        for i, first in enumerate(exact_duplicates(keys)):
            if first is not None:
                out[i] = (Reason.duplicate, first)
    if near:
        rest = [i for i in range(len(keys)) if out[i] is None]
        for i, match in zip(rest, near_duplicates([keys[i] for i in rest], threshold, ngram, num_perm)):
            if match is not None:
                out[i] = (Reason.near_duplicate, rest[match[1]])
    return out


SCORE_RE = re.compile(r"Score:\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_score(reply: str) -> float | None:
    """The number on the judge's last ``Score: N`` line, or None when there is none."""
    matches = SCORE_RE.findall(reply)
    return float(matches[-1]) if matches else None


def judge_reasons(score: float | None, threshold: float) -> list[Reason]:
    if score is None:
        return [Reason.judge_unparsed]
    return [Reason.judge_low_score] if score < threshold else []
