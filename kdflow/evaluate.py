"""Task accuracy of a model: greedy chain-of-thought answers checked against the gold final answers."""

from __future__ import annotations

from collections.abc import Callable

from kdflow.generate_hf import generate
from kdflow.prompts import render


def accuracy(model, tokenizer, rows: list[dict], template: str, check: Callable[[str, str], bool],
             max_new_tokens: int, batch_size: int) -> tuple[float, list[dict]]:
    """(accuracy, per-row predictions with ``text``, ``finish_reason`` and ``correct``)."""
    outputs = generate(model, tokenizer, [render(template, question=r["question"]) for r in rows],
                       max_new_tokens, batch_size)
    predictions = [{"id": r["id"], "answer": r["answer"], **o, "correct": check(o["text"], r["answer"])}
                   for r, o in zip(rows, outputs)]
    return sum(p["correct"] for p in predictions) / len(predictions), predictions
