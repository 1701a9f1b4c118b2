"""GSM8K from local files (``{"question", "answer"}`` per row, the answer ending in ``#### N``), read through
``kdflow.loaders`` (JSONL, parquet or a saved HF dataset). Teacher answers are checked with
``kdflow.verify`` (math-verify equivalence: ``72``, ``72.0``, ``$72``, ``\\boxed{72}`` are one answer)."""

from __future__ import annotations

import re
from pathlib import Path

from kdflow import verify
from kdflow.loaders import DataError, load_located_rows

# The gold answer in GSM8K's own solutions: always a plain number after '####'.
GOLD_RE = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def normalize_number(text: str) -> str | None:
    """'1,234' -> '1234', '72.0' -> '72', '-3.50' -> '-3.5'; None when it is not a number."""
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def gold_answer(solution: str) -> str | None:
    """The number after the last ``####`` of a GSM8K solution, normalised."""
    matches = GOLD_RE.findall(solution)
    return normalize_number(matches[-1]) if matches else None


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
    for i, (at, record) in enumerate(located):
        answer = gold_answer(str(record["answer"]))
        if answer is None:
            raise DataError(f"{at}: the answer does not end in '#### <number>'")
        rows.append({"id": f"{path.stem}-{i:06d}", "question": record["question"],
                     "rationale": record["answer"], "answer": answer})
    return rows
