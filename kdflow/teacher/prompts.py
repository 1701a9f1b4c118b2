"""What the teacher is asked: the zero-shot prompt of a row (what a student trains on), and the request the
teacher actually sees, which may add a system prompt and, for in-context distillation, k solved
demonstrations from a pool.

Row data is passed to Jinja as values, and a rendered prompt is passed on as a value too: nothing a question
contains is ever rendered as a template, so ``{{ 7*7 }}`` in a question reaches the teacher as written.
"""

from __future__ import annotations

import random

from kdflow.config.generation import Endpoint
from kdflow.config.templates import render
from kdflow.teacher.api_client import TeacherRequest


def zero_shot(template: str, row: dict) -> str:
    return render(template, question=row["question"])


def demonstrations(row_id: str, pool: list[dict], k: int, seed: int) -> list[dict]:
    """k pool rows for this row, the same in every run (seeded by the row id), never the row itself (a
    demonstration holding the row's own gold answer would leak it into the teacher's answer)."""
    rng = random.Random(f"{seed}:{row_id}")  # a str seed is hashed with sha512: stable across processes
    picks = [pool[i] for i in rng.sample(range(len(pool)), min(k + 1, len(pool)))]
    return [p for p in picks if p["id"] != row_id][:k]


def check_pool(pool: list[dict], k: int, split: str) -> None:
    if len(pool) < k + 1:
        raise ValueError(
            f"generation.icl.pool_split {split!r} has {len(pool)} rows; k = {k} demonstrations need "
            f"at least {k + 1}: lower k or use a larger split"
        )
    if any(not isinstance(p.get("rationale"), str) for p in pool):
        raise ValueError(
            f"generation.icl.pool_split {split!r} has rows without a gold `rationale` to demonstrate; "
            "use a split with solved examples (e.g. train)"
        )


def teacher_prompt(template: str, row: dict, icl_template: str | None = None, demos: list[dict] = ()) -> str:
    """The user turn the teacher sees: the zero-shot prompt, after the demonstrations when there are any."""
    prompt = zero_shot(template, row)
    if icl_template is None:
        return prompt
    shown = [{"prompt": zero_shot(template, d), "answer": d["rationale"]} for d in demos]
    return render(icl_template, demonstrations=shown, prompt=prompt)


def teacher_request(row: dict, sample: int, user: str, system: str | None, endpoint: Endpoint) -> TeacherRequest:
    if endpoint is Endpoint.chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return TeacherRequest(id=str(row["id"]), sample=sample, messages=messages)
    # The completions endpoint takes raw text: no chat template, so the system prompt simply comes first.
    return TeacherRequest(id=str(row["id"]), sample=sample, prompt=f"{system}\n\n{user}" if system else user)
