"""How answers are checked against gold (curation's correctness, evaluation's accuracy) and measured (the length
filter)."""

from __future__ import annotations

import pandas as pd

from data import arithmetic, gsm8k
from kdflow.config.data import DataSource
from kdflow.config.filters import FiltersSection


def answer_checker(source: DataSource):
    """(check(text, gold) -> bool, extract(text) -> answer | None) for the data source's answer format: the
    demo's exact ``Answer: N`` checker, or math-verify equivalence for GSM8K-style and free-form answers; for
    instruction data, functions that refuse to be called (``no_checker``)."""
    if source is DataSource.arithmetic:
        return arithmetic.check_answer, arithmetic.extract_answer
    if source is DataSource.instructions:
        return no_checker, no_checker
    return gsm8k.check_answer, gsm8k.final_answer


def no_checker(*_):
    """Free text (``source: instructions``) has references, not answers to verify: the recipe refuses every filter and
    metric that would call a checker, so reaching this is a bug, not a wrong answer."""
    raise TypeError(
        "source 'instructions' has no answer checker (free text is scored by ROUGE-L against the reference);"
        " a filter or metric that needs one should have been refused at recipe load"
    )


def token_counts(rows: list[dict], section: FiltersSection) -> list[int] | None:
    """Answer lengths for the length filter: in the student's tokenizer when the recipe names one, else the
    teacher's own count (the demo's students share the teacher's tokenizer)."""
    if section.length is None:
        return None
    if section.length.tokenizer is None:
        if rows and "completion_tokens" not in rows[0]:
            raise ValueError("filters.length needs filters.length.tokenizer: these answers carry no completion_tokens")
        return [0 if pd.isna(r["completion_tokens"]) else int(r["completion_tokens"]) for r in rows]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(section.length.tokenizer)
    return [len(ids) for ids in tokenizer([r["text"] or "" for r in rows], add_special_tokens=False)["input_ids"]]
