"""Curating teacher answers: every filter the recipe turns on, in one pass that loses nothing.

A dropped row is data: it keeps its raw text, every reason code that applies, and a human-readable
``detail`` (which row it duplicates, the judge's score, the majority answer). kept + dropped == input, always.

Order matters, and is fixed: (1) the per-row checks (truncated, empty, length, patterns, correctness) run on
every row and record all their reasons; (2) self-consistency picks among a prompt's surviving samples (before
dedup, because identical samples are votes); (3) dedup runs on the survivors, so a kept answer is never
dropped as a copy of a wrong one; (4) the LLM judge, the expensive one, sees only what is left.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable

from kdflow.config.filters import DedupOn, FiltersSection
from kdflow.config.templates import render
from kdflow.curation.filters import (
    Reason,
    correctness_reasons,
    duplicate_reasons,
    judge_reasons,
    length_reasons,
    parse_score,
    pattern_reasons,
)
from kdflow.curation.verify import VerifyTimeout, majority, select

# The curate stage's datasets: the answers kept (what students train on), and every drop with its reasons.
KEPT, DROPPED = "kept.parquet", "dropped.parquet"

Check = Callable[[str, object], bool]
Extract = Callable[[str], object]


def has_gold(row: dict) -> bool:
    gold = row.get("answer")
    return gold is not None and not (isinstance(gold, float) and math.isnan(gold)) and str(gold).strip() != ""


def row_name(row: dict) -> str:
    return f"{row['id']}/{row.get('sample', 0)}"


def row_reasons(
    row: dict,
    section: FiltersSection,
    check: Check,
    extract: Extract,
    tokens: int | None,
    patterns: tuple[list[re.Pattern], re.Pattern | None] | None,
) -> tuple[list[Reason], str]:
    """Step 1: every per-row reason that applies (all of them, not just the first), and a detail when one
    needs it (why verification gave up)."""
    text = row["text"] or ""
    reasons = []
    if section.truncated and row.get("finish_reason") == "length":
        reasons.append(Reason.truncated)
    if section.empty and not text.strip():
        reasons.append(Reason.empty_answer)
    if section.length is not None and tokens is not None:
        reasons += length_reasons(tokens, section.length.min_tokens, section.length.max_tokens)
    if patterns is not None:
        reasons += pattern_reasons(text, *patterns)
    try:
        if section.correctness and has_gold(row):
            reasons += correctness_reasons(text, row["answer"], check, extract)
        elif section.self_consistency is not None and extract(text) is None:
            reasons.append(Reason.no_final_answer)  # no gold: the majority vote needs an answer
    except VerifyTimeout as e:
        return [*reasons, Reason.verify_timeout], str(e)
    return reasons, ""


def compile_patterns(section: FiltersSection):
    if section.patterns is None:
        return None
    # One alternation, not one search per pattern: the scan of each text is the cost of this filter.
    joined = "|".join(f"(?:{p})" for p in section.patterns.refusal)
    refusals = [re.compile(joined, re.IGNORECASE)] if joined else []
    required = re.compile(section.patterns.required) if section.patterns.required else None
    return refusals, required


def self_consistency(
    rows: list[dict],
    alive: list[int],
    section: FiltersSection,
    check: Check,
    extract: Extract,
    reasons: list[list[Reason]],
    details: list[str],
) -> None:
    """Step 2, per prompt: gold rows keep their correct samples under the policy; rows without gold keep the
    majority answer's samples (minority ones and ties are dropped), then the policy."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i in alive:
        groups[rows[i]["id"]].append(i)
    sc = section.self_consistency
    for members in groups.values():
        if not has_gold(rows[members[0]]):
            texts = [rows[i]["text"] for i in members]
            gave_up: dict[int, str] = {}  # index into members -> why math-verify gave no verdict
            winner = majority(texts, check, extract, gave_up)
            agrees: dict[int, bool] = {}  # index into members -> its answer is the majority's
            if winner is not None:
                answer = extract(texts[winner])  # parsed in the vote a moment ago (the worker caches it)
                for j in range(len(members)):
                    try:
                        agrees[j] = j not in gave_up and check(texts[j], answer)
                    except VerifyTimeout as e:
                        gave_up[j] = str(e)
                agrees = {j: same for j, same in agrees.items() if j not in gave_up}
            for j, why in gave_up.items():
                reasons[members[j]].append(Reason.verify_timeout)
                details[members[j]] = why
            if winner is None:
                for j, i in enumerate(members):
                    if j not in gave_up:
                        reasons[i].append(Reason.no_majority)
                        details[i] = f"no majority among {len(members) - len(gave_up)} samples"
                continue
            losers = [members[j] for j, same in agrees.items() if not same]
            for i in losers:
                reasons[i].append(Reason.minority_answer)
                details[i] = f"majority answer {answer}"
            members = [members[j] for j, same in agrees.items() if same]
        chosen = {members[j] for j in select([rows[i] for i in members], sc.policy, sc.k)}
        for i in members:
            if i not in chosen:
                reasons[i].append(Reason.not_selected)
                details[i] = f"policy {sc.policy.value} kept {len(chosen)} of {len(members)}"


def dedup_key(row: dict, on: DedupOn) -> str:
    if on is DedupOn.text:
        return row["text"]
    if on is DedupOn.question:
        return row["question"]
    return f"{row['question']}\n{row['text']}"


def dedup(
    rows: list[dict], alive: list[int], section: FiltersSection, reasons: list[list[Reason]], details: list[str]
) -> None:
    """Step 3: the first of a set of (near) copies stays; the others point at it."""
    d = section.dedup
    found = duplicate_reasons(
        [dedup_key(rows[i], d.by) for i in alive], d.exact, d.near, d.threshold, d.ngram, d.num_perm
    )
    for i, match in zip(alive, found):
        if match is not None:
            reasons[i].append(match[0])
            details[i] = f"{match[0].value} of {row_name(rows[alive[match[1]]])}"


def judge_prompts(rows: list[dict], template: str) -> list[str]:
    return [render(template, question=r["question"], answer=r["text"]) for r in rows]


def run_judge(
    rows: list[dict],
    alive: list[int],
    section: FiltersSection,
    template: str,
    complete: Callable[[list[str]], list[str]],
    reasons: list[list[Reason]],
    details: list[str],
) -> None:
    """Step 4: ``complete`` (the teacher backend: prompts -> replies) scores each answer; its reply is kept."""
    replies = complete(judge_prompts([rows[i] for i in alive], template))
    for i, reply in zip(alive, replies, strict=True):
        score = parse_score(reply)
        rows[i] = {**rows[i], "judge_score": score, "judge_reply": reply}
        new = judge_reasons(score, section.judge.threshold)
        reasons[i] += new
        if new:
            details[i] = (
                f"judge score {score} < {section.judge.threshold}" if score is not None else "judge gave no score"
            )


def curate(
    rows: list[dict],
    section: FiltersSection,
    check: Check,
    extract: Extract,
    tokens: list[int] | None = None,
    judge_template: str | None = None,
    complete: Callable[[list[str]], list[str]] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Split ``rows`` into (kept, dropped); each dropped row gains ``reasons`` (codes) and ``detail``.
    ``tokens``: the answer's length in the student's tokens, per row (the length filter needs it)."""
    if section.judge is not None and (complete is None or judge_template is None):
        raise ValueError("filters.judge is set: pass the judge template and a teacher `complete` function")
    if section.length is not None and tokens is None:
        raise ValueError("filters.length is set: pass each answer's length in the student's tokens")
    rows = [{**r, "sample": r.get("sample", 0)} for r in rows]
    if tokens is not None:
        rows = [{**r, "tokens": t} for r, t in zip(rows, tokens, strict=True)]
    patterns = compile_patterns(section)
    reasons, details = (
        map(list, zip(*[row_reasons(r, section, check, extract, r.get("tokens"), patterns) for r in rows]))
        if rows
        else ([], [])
    )
    alive = lambda: [i for i in range(len(rows)) if not reasons[i]]  # noqa: E731
    if section.self_consistency is not None:
        self_consistency(rows, alive(), section, check, extract, reasons, details)
    if section.dedup is not None:
        dedup(rows, alive(), section, reasons, details)
    if section.judge is not None:
        run_judge(rows, alive(), section, judge_template, complete, reasons, details)
    kept = [rows[i] for i in range(len(rows)) if not reasons[i]]
    dropped = [
        {**rows[i], "reasons": [r.value for r in reasons[i]], "detail": details[i]}
        for i in range(len(rows))
        if reasons[i]
    ]
    assert len(kept) + len(dropped) == len(rows)
    return kept, dropped


def filter_by_correctness(rows: list[dict], check: Check, extract: Extract) -> tuple[list[dict], list[dict]]:
    """The demo's default filters (truncated, empty, correctness): ``curate`` with a default section."""
    return curate(rows, FiltersSection(), check, extract)


def reason_counts(dropped: list[dict]) -> dict[str, int]:
    return dict(Counter(reason for row in dropped for reason in row["reasons"]))
