"""GSM8K from local JSONL files (``{"question", "answer"}`` per line, the answer ending in ``#### N``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

FINAL_RE = re.compile(r"(?:####|Answer:)\s*\$?\s*(-?[\d,]*\.?\d+)")


def normalize_number(text: str) -> str | None:
    """'1,234' -> '1234', '72.0' -> '72', '-3.50' -> '-3.5'; None when it is not a number."""
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def final_answer(text: str) -> str | None:
    """The number after the last ``####`` (or ``Answer:``) in the text."""
    matches = FINAL_RE.findall(text)
    return normalize_number(matches[-1]) if matches else None


def check_answer(text: str, gold: str) -> bool:
    got = final_answer(text)
    return got is not None and got == normalize_number(str(gold))


def load_split(path: Path, n: int | None = None) -> list[dict]:
    """Rows ``{id, question, rationale, answer}``; a malformed line fails naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if n is not None and len(rows) >= n:
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            missing = {"question", "answer"} - set(record)
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {sorted(missing)}; GSM8K rows need question and answer")
            answer = final_answer(record["answer"])
            if answer is None:
                raise ValueError(f"{path}:{lineno}: the answer does not end in '#### <number>'")
            rows.append({"id": f"{path.stem}-{lineno - 1:06d}", "question": record["question"],
                         "rationale": record["answer"], "answer": answer})
    return rows
