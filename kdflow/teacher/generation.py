"""The generate stage's work, without Prefect: the (row, sample) requests a recipe asks for, answered by the
teacher's backend (``kdflow.teacher.completion``), and the answer and failure tables the stage writes.

API answers are persisted one by one as they arrive (``kdflow.teacher.answer_shards``) in a folder the caller
names, so a crash, a kill or a rerun never pays twice for an answer.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import pandas as pd

from kdflow.config.generation import Backend, GenerationSection
from kdflow.store.outputs import OutputRef
from kdflow.store.run_folder import read_split
from kdflow.teacher import api_keys
from kdflow.teacher.answer_shards import ShardWriter, read_shards
from kdflow.teacher.api_client import FailureReason, FatalApiError, RequestAccounting, Sampling
from kdflow.teacher.completion import TeacherBackend
from kdflow.teacher.prompts import check_pool, demonstrations, teacher_prompt, teacher_request, zero_shot

ROW_FIELDS = ("id", "split", "question", "answer")
# The generate stage's files: one answer per (row, sample), and the requests that failed for good.
ANSWERS, FAILURES = "answers.parquet", "failures.parquet"


class TooManyFailures(RuntimeError):
    """More teacher requests failed for good than the recipe allows."""


def prompted_rows(section: GenerationSection, template: str, data: OutputRef) -> list[dict]:
    """Every (row, sample) to answer, with the zero-shot ``prompt`` and the ``teacher_prompt`` it is asked with."""
    rows = [
        {**{k: r[k] for k in ROW_FIELDS if k in r}, "split": split}
        for split in section.splits
        for r in read_split(data, split)
    ]
    icl = section.icl
    pool = read_split(data, icl.pool_split) if icl else []
    if icl:
        check_pool(pool, icl.k, icl.pool_split)
    out = []
    for row in rows:
        demos = demonstrations(row["id"], pool, icl.k, icl.seed) if icl else []
        asked = teacher_prompt(template, row, icl.template_text if icl else None, demos)
        extra = {"demo_ids": [d["id"] for d in demos]} if icl else {}
        for sample in range(section.n):
            out.append({**row, "sample": sample, "prompt": zero_shot(template, row), "teacher_prompt": asked, **extra})
    return out


def env_key(section: GenerationSection) -> Callable[[], str | None]:
    """The key from the environment variable the recipe names. A Prefect Secret block is read by the Prefect task
    (tasks/generate.py), which passes its own ``api_key``."""

    def key() -> str | None:
        if section.api.api_key_secret_block:
            raise FatalApiError(
                "generation.api.api_key_secret_block names a Prefect Secret block: run the stage "
                "as its Prefect task, which reads it, or pass api_key"
            )
        return api_keys.from_env(section.api.api_key_env, "generation.api.api_key_env")

    return key


def backend(section: GenerationSection, model: str, api_key: Callable[[], str | None] | None = None) -> TeacherBackend:
    """The teacher as the recipe's generation section asks it. ``model``: the served model name (openai), or the
    model folder (hf, vllm: the server serves it under its path)."""
    a = section.api
    return TeacherBackend(
        section.backend,
        model,
        base_url=a.base_url,
        api_key=api_key or env_key(section),
        timeout_s=a.timeout_s,
        concurrency=a.concurrency,
        max_retries=a.max_retries,
        batch_size=section.batch_size,
        vllm=section.vllm,
    )


def hf_answers(
    section: GenerationSection, model_dir: str, rows: list[dict]
) -> tuple[list[dict], list[dict], RequestAccounting]:
    """The teacher's answers in this process, and as failures (``bad_request``, as a server would reject them) the
    prompts that do not fit its context with ``max_new_tokens``."""
    from kdflow.teacher.hf_generate import TOO_LONG  # torch, only where the teacher runs here

    outputs, acct = backend(section, model_dir).hf_generate(
        [r["teacher_prompt"] for r in rows],
        section.max_new_tokens,
        temperature=section.temperature,
        seed=section.seed or 0,
    )
    answers, failed = [], []
    for r, o in zip(rows, outputs):
        if o["finish_reason"] != TOO_LONG:
            answers.append({"id": r["id"], "sample": r["sample"], "ok": True, **o})
            continue
        error = (
            f"prompt of {o['prompt_tokens']} tokens + generation.max_new_tokens {section.max_new_tokens} is longer "
            "than the teacher's context (config max_position_embeddings): shorten the prompt or max_new_tokens"
        )
        failed.append(
            {"id": r["id"], "sample": r["sample"], "ok": False, "reason": FailureReason.bad_request.value}
            | {"status": None, "error": error, "attempts": 0, "raw": None}
        )
    return answers, failed, acct


def api_answers(
    section: GenerationSection,
    model: str,
    rows: list[dict],
    folder: Path,
    on_progress=None,
    api_key: Callable[[], str | None] | None = None,
) -> tuple[list[dict], list[dict], RequestAccounting]:
    """Ask for every (row, sample) the shards in ``folder`` do not answer yet; return all answers and the
    failures for good. ``model``: the served model name (backend openai), or the model folder vLLM serves."""
    answered, _ = read_shards(folder)
    todo = [r for r in rows if (str(r["id"]), r["sample"]) not in answered]
    s = Sampling(
        model=model,
        max_tokens=section.max_new_tokens,
        temperature=section.temperature,
        top_p=section.top_p,
        seed=section.seed,
        logprobs=section.logprobs,
        endpoint=section.api.endpoint,
        token_ids=section.api.token_ids or section.backend is Backend.vllm,
    )
    requests = (
        teacher_request(r, r["sample"], r["teacher_prompt"], section.system_prompt, section.api.endpoint) for r in todo
    )
    if not todo:  # all answered before a crash: no server to start, nothing to ask
        acct = RequestAccounting(resumed=len(rows))
    else:
        with ShardWriter(folder) as shard:
            acct = backend(section, model, api_key).run(
                requests,
                s,
                seed=section.seed or 0,
                on_progress=on_progress,
                resumed=len(rows) - len(todo),
                on_record=shard.append,
            )
    answered, failed = read_shards(folder)
    return list(answered.values()), list(failed.values()), acct


def check_failures(failures: list[dict], total: int, section: GenerationSection, folder: Path) -> None:
    if not failures or len(failures) / total <= section.api.max_failure_fraction:
        return
    reasons = dict(Counter(f["reason"] for f in failures))
    raise TooManyFailures(
        f"{len(failures)} of {total} teacher requests failed for good ({len(failures) / total:.1%} > "
        f"generation.api.max_failure_fraction {section.api.max_failure_fraction:.1%}); by reason {reasons}; "
        f"first: {failures[0]['error']}. The {total - len(failures)} answers are kept in {folder}: "
        "a rerun asks only for the failed and missing ones"
    )


def answer_table(rows: list[dict], records: list[dict]) -> pd.DataFrame:
    """One row per (row, sample) answered: the row's fields, the prompt a student trains on, the answer."""
    by_key = {(str(r["id"]), r["sample"]): r for r in rows}
    out = []
    for rec in records:
        row = by_key[(str(rec["id"]), rec["sample"])]
        logprobs = rec.get("logprobs") or {}
        out.append(
            {
                **{k: v for k, v in row.items() if k != "teacher_prompt"},
                "text": rec["text"],
                "finish_reason": rec["finish_reason"],
                "completion_tokens": rec["completion_tokens"],
                "prompt_tokens": rec.get("prompt_tokens"),
                **logprobs,
            }
        )
    order = {key: i for i, key in enumerate(by_key)}
    out.sort(key=lambda a: order[(str(a["id"]), a["sample"])])
    try:
        return pd.DataFrame(out)
    except UnicodeEncodeError:  # a lone surrogate in a reply: pyarrow names neither the row nor the field
        from kdflow.store.data_files import check_utf8

        check_utf8(out, "teacher answers")
        raise


def failure_table(rows: list[dict], failed: list[dict]) -> pd.DataFrame:
    by_key = {(str(r["id"]), r["sample"]): r for r in rows}
    # raw: the body of a reply that was no completion (invalid_response), kept so it can be read; else None.
    columns = [*ROW_FIELDS, "sample", "prompt", "reason", "status", "error", "attempts", "raw"]
    out = [
        {
            **{k: v for k, v in by_key[(str(f["id"]), f["sample"])].items() if k != "teacher_prompt"},
            **{k: f.get(k) for k in ("reason", "status", "error", "attempts", "raw")},
        }
        for f in failed
    ]
    return pd.DataFrame(out, columns=columns if not out else None)
