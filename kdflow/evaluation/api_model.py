"""The quality of a model behind an API (an API teacher), without Prefect: greedy answers to the split's questions
through its ``TeacherBackend``, each reply kept by the prompt's hash as the LLM judge's are (``judge.ask_judge``), so a
rerun asks the API nothing it has answered already, then the same answer checker as for local models.

Only accuracy can be had: perplexity, agreement, KL and every deployment figure need the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from kdflow.config.templates import render
from kdflow.evaluation.judge import ask_judge, prompt_id
from kdflow.evaluation.quality import checked
from kdflow.teacher.api_client import Accounting
from kdflow.teacher.completion import TeacherBackend

WEIGHTS_UNAVAILABLE = "API model: weights not available"


def api_accuracy(model: TeacherBackend, rows: list[dict], template: str, check: Callable[[str, str], bool],
                 max_new_tokens: int, folder: Path, system: str | None = None) -> tuple[dict, list[dict], Accounting]:
    """(metrics, one prediction per row, what the requests cost). ``template`` and ``system``: the prompt the model
    answered the students' questions with. A request that failed for good is a wrong answer whose prediction keeps
    the failure's ``reason`` (``failed`` in the metrics counts them)."""
    prompts = [render(template, question=r["question"]) for r in rows]
    replies, acct = ask_judge(model, max_new_tokens, prompts, folder, system)
    predictions = []
    for r, prompt in zip(rows, prompts):
        reply = replies[prompt_id(prompt)]
        text = reply.get("text") if reply.get("ok", True) else None
        correct, unverified = checked(check, text, r["answer"]) if text is not None else (False, None)
        predictions.append({"id": r["id"], "answer": r["answer"], "text": text,
                            "finish_reason": reply.get("finish_reason"), "correct": correct,
                            "unverified": unverified, "failure": None if text is not None else reply.get("reason")})
    failed = sum(p["text"] is None for p in predictions)
    metrics = {"accuracy": sum(p["correct"] for p in predictions) / max(len(predictions), 1), "rows": len(rows),
               "failed": failed}
    return metrics, predictions, acct
