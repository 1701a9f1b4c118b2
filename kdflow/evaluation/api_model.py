"""The quality of a model behind an API (an API teacher), without Prefect: greedy answers to the split's questions
through its ``TeacherBackend``, each reply kept by the prompt's hash as the LLM judge's are (``judge.ask_judge``), so a
rerun asks the API nothing it has answered already, then the same answer checker as for local models (or, for free
text, the same ROUGE-L).

Only accuracy (or ROUGE-L) can be had: perplexity, agreement, KL and every deployment figure need the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from kdflow.config.templates import render
from kdflow.evaluation.free_text import scored
from kdflow.evaluation.judge import ask_judge, prompt_id
from kdflow.evaluation.quality import checked
from kdflow.teacher.api_client import RequestAccounting
from kdflow.teacher.completion import TeacherBackend

WEIGHTS_UNAVAILABLE = "API model: weights not available"
IMPORTED_ONLY = "the teacher is known only by its imported logit dataset: weights not here"


def api_answers(
    model: TeacherBackend, rows: list[dict], template: str, max_new_tokens: int, folder: Path, system: str | None = None
) -> tuple[list[dict], RequestAccounting]:
    """(one prediction per row: ``id``, ``answer``, ``text``, ``finish_reason``, ``failure``; what the requests cost).
    ``template`` and ``system``: the prompt the model answered the students' questions with. A request that failed for
    good has ``text`` None and keeps the failure's reason."""
    prompts = [render(template, question=r["question"]) for r in rows]
    replies, acct = ask_judge(model, max_new_tokens, prompts, folder, system)
    predictions = []
    for r, prompt in zip(rows, prompts):
        reply = replies[prompt_id(prompt)]
        text = reply.get("text") if reply.get("ok", True) else None
        predictions.append(
            {
                "id": r["id"],
                "answer": r["answer"],
                "text": text,
                "finish_reason": reply.get("finish_reason"),
                "failure": None if text is not None else reply.get("reason"),
            }
        )
    return predictions, acct


def api_accuracy(
    model: TeacherBackend,
    rows: list[dict],
    template: str,
    check: Callable[[str, str], bool],
    max_new_tokens: int,
    folder: Path,
    system: str | None = None,
) -> tuple[dict, list[dict], RequestAccounting]:
    """(metrics, one prediction per row, what the requests cost), as ``api_answers``, each answer checked: a request
    that failed for good is a wrong answer (``failed`` in the metrics counts them)."""
    answers, acct = api_answers(model, rows, template, max_new_tokens, folder, system)
    predictions = []
    for a in answers:  # the columns in the order they always had: the verdict before the failure
        correct, unverified = checked(check, a["text"], a["answer"]) if a["text"] is not None else (False, None)
        predictions.append(
            {
                **{k: v for k, v in a.items() if k != "failure"},
                "correct": correct,
                "unverified": unverified,
                "failure": a["failure"],
            }
        )
    failed = sum(p["text"] is None for p in predictions)
    metrics = {
        "accuracy": sum(p["correct"] for p in predictions) / max(len(predictions), 1),
        "rows": len(rows),
        "failed": failed,
    }
    return metrics, predictions, acct


def api_rouge_l(
    model: TeacherBackend, rows: list[dict], template: str, max_new_tokens: int, folder: Path, system: str | None = None
) -> tuple[dict, list[dict], RequestAccounting]:
    """As ``api_accuracy`` for free text (``source: instructions``): each answer's ROUGE-L against the reference, a
    request that failed for good scoring 0."""
    predictions, acct = api_answers(model, rows, template, max_new_tokens, folder, system)
    rouge, predictions = scored(predictions)
    return (
        {"rouge_l": rouge, "rows": len(rows), "failed": sum(p["text"] is None for p in predictions)},
        predictions,
        acct,
    )
