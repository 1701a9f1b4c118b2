"""Asking an LLM judge, without Prefect: each prompt asked once through the judge's backend
(``kdflow.teacher.completion``), its reply persisted by the prompt's hash (``kdflow.teacher.answer_shards``), so a
crash, a rerun or a new student asks the judge nothing it has answered already. The verdicts and win rates are
``kdflow.evaluation.quality``'s."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Callable

import pandas as pd

from kdflow.config.evaluation import EvaluationSection
from kdflow.evaluation.model_metrics import PREDICTIONS
from kdflow.store.outputs import OutputRef
from kdflow.teacher import api_keys
from kdflow.teacher.answer_shards import ShardWriter, read_shards
from kdflow.teacher.api_client import RequestAccounting
from kdflow.teacher.completion import TeacherBackend

# The judge stage's files: every judgement with the raw reply, and each student's win rate.
JUDGEMENTS, WIN_RATES = "judgements.parquet", "win_rates.json"


class TooManyJudgeFailures(RuntimeError):
    """More judge requests failed for good than evaluation.judge.max_failure_fraction allows."""


def prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:32]


def env_key(section: EvaluationSection.Judge) -> str | None:
    return api_keys.from_env(section.api_key_env, "evaluation.judge.api_key_env")


def backend(section: EvaluationSection.Judge, api_key: Callable[[], str | None] | None = None) -> TeacherBackend:
    """The judge as its recipe section names it; ``api_key`` reads the key when a request is about to be sent."""
    return TeacherBackend(
        section.backend,
        section.model,
        base_url=section.base_url,
        api_key=api_key or (lambda: env_key(section)),
        timeout_s=section.timeout_s,
        concurrency=section.concurrency,
        max_retries=section.max_retries,
        batch_size=section.batch_size,
        vllm=section.vllm,
    )


def ask_judge(
    judge: TeacherBackend, max_new_tokens: int, prompts: list[str], folder: Path, system: str | None = None
) -> tuple[dict[str, dict], RequestAccounting]:
    """The judge's reply record (``ok`` True with ``text``, or a failure with its ``reason``) to every prompt, by
    ``prompt_id``. Only prompts ``folder`` holds no reply to are asked; no server starts when there are none.
    ``system``: a system message before each prompt (name ``folder`` after it: replies are kept by prompt alone)."""
    ids = {prompt_id(p): p for p in prompts}
    answered, _ = read_shards(folder)
    todo = {i: p for i, p in ids.items() if (i, 0) not in answered}
    acct = RequestAccounting(resumed=len(ids) - len(todo))
    if todo:
        with ShardWriter(folder) as shard:
            acct = judge.ask(todo, max_new_tokens, shard.append, system)
        acct.resumed = len(ids) - len(todo)
    answered, failed = read_shards(folder)
    return {i: answered.get((i, 0)) or failed[(i, 0)] for i in ids}, acct


def check_judge_failures(judgements: list[dict], section: EvaluationSection.Judge, folder: Path) -> None:
    failed = [j for j in judgements if j["text"] is None]
    if failed and len(failed) / len(judgements) > section.max_failure_fraction:
        reasons = dict(Counter(j["reason"] for j in failed))
        raise TooManyJudgeFailures(
            f"{len(failed)} of {len(judgements)} judge requests failed for good ({len(failed) / len(judgements):.1%} > "
            f"evaluation.judge.max_failure_fraction {section.max_failure_fraction:.1%}); by reason {reasons}; first: "
            f"{failed[0]['error']}. The replies received are kept in {folder}: a rerun asks only for the others"
        )


def predictions(evaluation: OutputRef) -> list[dict]:
    """A model's greedy answers (``id``, ``text``, ...) from its evaluate-stage output."""
    return pd.read_parquet(Path(evaluation.path) / PREDICTIONS).to_dict("records")
