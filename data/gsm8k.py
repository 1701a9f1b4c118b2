"""GSM8K from local files (``{"question", "answer"}`` per row, the answer ending in ``#### N``), read through
``kdflow.store.data_files`` (JSONL, parquet or a saved HF dataset). Teacher answers are checked with
``kdflow.curation.verify`` (math-verify equivalence: ``72``, ``72.0``, ``$72``, ``\\boxed{72}`` are one answer)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

from kdflow.curation import verify
from kdflow.store.data_files import DataError, load_located_rows

# The gold answer after the last '####': a number (1,234 / -3.5 / 1e5 / 3/4), optionally after '$'. GSM8K's own are
# all integers, but a file in its format may hold others, and a prefix of one (3 of 3/4, 1 of 1e5) is a wrong gold.
NUMBER = r"-?(?:\d[\d,]*)?\.?\d+"
GOLD_RE = re.compile(rf"####\s*\$?\s*(?P<num>{NUMBER}(?:[eE][-+]?\d+)?(?:\s*/\s*{NUMBER})?)(?P<rest>[^\n]*)")
# What may follow the number on its line: nothing, or words and punctuation that do not continue the number.
CONTINUES = re.compile(r"[\d.,/eE^]\s*\d|[/^eE]")


# Digits a gold number may take written out (before or after the point). Exact arithmetic has no other limit, but
# '#### 1e999999' would be written out as a million digits: no GSM8K-style answer is that long.
MAX_DIGITS = 100


def normalize_number(text: str) -> str | None:
    """'1,234' -> '1234', '72.0' -> '72', '-3.50' -> '-3.5', '1e5' -> '100000', exactly (a float turned
    12345678901234567891 into ...7168 and 1e400 into inf); None when it is not a number, or longer than
    ``MAX_DIGITS`` digits written out."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    _, digits, exponent = value.normalize().as_tuple()
    if max(len(digits) + exponent, len(digits), -exponent) > MAX_DIGITS:
        return None
    return str(int(value)) if value == value.to_integral_value() else format(value.normalize(), "f")


def parse_gold(solution: str) -> tuple[str | None, str]:
    """(the number after the last ``####``, normalised; or None) and, when None, why: ``1e5`` -> ``100000``,
    ``3/4`` -> ``3/4`` (math-verify compares it with 0.75), ``6/8`` -> ``3/4``, ``4/2`` -> ``2``."""
    if "####" not in solution:
        return None, "the answer does not end in '#### <number>'"
    tail = solution.rsplit("####", 1)[1].strip().split("\n", 1)[0]
    match = GOLD_RE.match("####" + tail)
    if match is None or CONTINUES.match(match["rest"]):
        return None, (
            f"the gold answer '#### {tail[:40]}' is not a number kdflow reads (integers, decimals, 1e5, "
            "3/4); write the final number after '####'"
        )
    text = re.sub(r"\s+", "", match["num"]).replace(",", "")
    if "/" not in text:
        if (number := normalize_number(text)) is None:
            return None, (
                f"the gold answer '#### {tail[:40]}' has more than {MAX_DIGITS} digits written out; write "
                "the final number after '####'"
            )
        return number, ""
    numerator, denominator = (Fraction(part) for part in text.split("/"))
    if denominator == 0:
        return None, f"the gold answer '#### {tail[:40]}' divides by zero; write the final number after '####'"
    value = numerator / denominator
    return (str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"), ""


def gold_answer(solution: str) -> str | None:
    """The number after the last ``####`` of a GSM8K solution, normalised (None when there is none)."""
    return parse_gold(solution)[0]


def final_answer(text: str) -> str | None:
    """The final answer of a teacher's text (``#### N``, ``Answer: N``, ``\\boxed{N}``, ...), or None."""
    return verify.final_answer(text)


def check_answer(text: str, gold) -> bool:
    return verify.check_answer(text, gold)


def load_split(path: Path, n: int | None = None) -> list[dict]:
    """Rows ``{id, question, rationale, answer}``; a malformed row fails naming the file and line."""
    path = Path(path)
    rows = []
    located = load_located_rows(path, required=("question", "answer"), prompt_field="question", n=n)
    if not located:  # an empty split would fail much later, dividing by its zero rows
        raise DataError(
            f"{path}: no rows; put GSM8K rows in it (one JSON object per line with question and answer) "
            "or remove the split from data.splits"
        )
    if n is not None and len(located) < n:  # the run would say it used n rows (manifests, report) and use fewer
        raise DataError(
            f"{path}: {len(located)} rows, but data.splits asks {n} of {path.stem!r}: lower data.splits."
            f"{path.stem} to {len(located)} or add rows"
        )
    for i, (at, record) in enumerate(located):
        answer, why = parse_gold(str(record["answer"]))
        if answer is None:
            raise DataError(f"{at}: {why}")
        rows.append(
            {
                "id": f"{path.stem}-{i:06d}",
                "question": record["question"],
                "rationale": record["answer"],
                "answer": answer,
            }
        )
    return rows
