"""Which answer checker a data source uses: each source's module owns its own (``data.arithmetic``: the demo's exact
``Answer: N``; ``data.gsm8k``: math-verify equivalence, for GSM8K-style and free-form answers; ``data.instructions``:
none, free text has references, not answers to verify). Curation's correctness and evaluation's accuracy take the
pair from here; the library (kdflow/) never imports ``data``, it is handed the functions."""

from __future__ import annotations

from data import arithmetic, gsm8k, instructions
from kdflow.config.data import DataSource


def answer_checker(source: DataSource):
    """(check(text, gold) -> bool, extract(text) -> answer | None) for the data source's answer format: the
    demo's exact ``Answer: N`` checker, or math-verify equivalence for GSM8K-style and free-form answers; for
    instruction data, functions that refuse to be called (``data.instructions.no_checker``)."""
    if source is DataSource.arithmetic:
        return arithmetic.check_answer, arithmetic.extract_answer
    if source is DataSource.instructions:
        return instructions.no_checker, instructions.no_checker
    return gsm8k.check_answer, gsm8k.final_answer
