"""Stage 2: the teacher answers questions (chain-of-thought by default; the recipe may pick another template,
a system prompt, few-shot demonstrations, n samples per prompt and top-k logprobs).

Backends: ``hf`` (transformers, batched, in-process: CPUs), ``openai`` (any OpenAI-compatible API) and
``vllm`` (a local vLLM server started for the stage and stopped after it, used through the same client).
API answers are persisted one by one as they arrive (``kdflow.teacher.answer_shards``) in a folder next to the
output, so a crash, a kill or a rerun never pays twice for an answer; the output has exactly one answer per
(row, sample) in ``answers.parquet``, and requests that failed for good in ``failures.parquet`` with their
reason code, error and (for a reply that was no completion) the raw body.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from tqdm import tqdm

from kdflow.teacher.answer_shards import ShardWriter, read_shards
from kdflow.store.model_folders import model_location
from kdflow.teacher.api_client import Accounting, FatalApiError, Sampling, run_all
from kdflow.store.outputs import OutputRef, output_dir
from kdflow.store.run_folder import read_split
from kdflow.config.generation import Backend, GenerationSection
from kdflow.teacher.prompts import check_pool, demonstrations, teacher_prompt, teacher_request, zero_shot
from kdflow.teacher.vllm_server import vllm_server
from kdflow.store.stage import Stage
from tasks.caching import STAGE_RESULTS, StageCache

# Every prompt text is content: the CoT template here, the recipe's own template, few-shot template and system
# prompt inside the section (its template_text fields are computed, hence in its dump).
GENERATE = Stage("generate", "2", lambda section, template, teacher, data: {
    "section": section, "template": template, "teacher": teacher, "data": data})
PROGRESS_EVERY_S = 2.0  # Prefect progress artifact updates: often enough to watch, rare enough to cost nothing
ROW_FIELDS = ("id", "split", "question", "answer")


class TooManyFailures(RuntimeError):
    """More teacher requests failed for good than the recipe allows."""


def shard_folder(run_dir: Path, key: str) -> Path:
    """Where answers are persisted while the stage runs (kept across crashes; removed once the output is done)."""
    return output_dir(run_dir, GENERATE.name, key).with_name(f".shards-{key[:16]}")


def api_key(section: GenerationSection) -> str | None:
    """The key from the Prefect Secret block or environment variable the recipe names (the value never is)."""
    if section.api.api_key_secret_block:
        from prefect.blocks.system import Secret

        return Secret.load(section.api.api_key_secret_block).get()
    from kdflow.teacher.api_keys import from_env  # an unset or empty variable fails naming it (not as a 401)

    return from_env(section.api.api_key_env, "generation.api.api_key_env")


def _no_retry_on_verdicts(task, task_run, state) -> bool:
    """Retry the task on a blip (its answers are kept), not when the API refused the key or too many rows failed."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, (FatalApiError, TooManyFailures))


def prompted_rows(section: GenerationSection, template: str, data: OutputRef) -> list[dict]:
    """Every (row, sample) to answer, with the zero-shot ``prompt`` and the ``teacher_prompt`` it is asked with."""
    rows = [{**{k: r[k] for k in ROW_FIELDS if k in r}, "split": split}
            for split in section.splits for r in read_split(data, split)]
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


def hf_answers(section: GenerationSection, teacher: OutputRef, rows: list[dict]) -> tuple[list[dict], Accounting]:
    from kdflow.teacher.hf_generate import generate, load

    model, tokenizer = load(model_location(teacher))
    start = time.perf_counter()
    outputs = generate(model, tokenizer, [r["teacher_prompt"] for r in rows], section.max_new_tokens,
                       section.batch_size, section.temperature, seed=section.seed or 0)
    acct = Accounting(requests=len(rows), answers=len(rows), seconds=time.perf_counter() - start,
                      completion_tokens=sum(o["completion_tokens"] for o in outputs))
    return [{"id": r["id"], "sample": r["sample"], "ok": True, **o} for r, o in zip(rows, outputs)], acct


class Progress:
    """A terminal progress bar, and a Prefect progress artifact refreshed every few seconds by a thread of its
    own: the client calls this from inside its event loop, where Prefect's sync API would not run (and an
    HTTP call per answer would slow the requests down)."""

    def __init__(self, total: int, already: int):
        self.total, self.done = total, already
        self.bar = tqdm(total=total, initial=already, desc="teacher", unit="req", mininterval=1.0)
        self.artifact = create_progress_artifact(progress=self.percent(), key="teacher-progress",
                                                 description="teacher requests answered or failed for good")
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._publish, daemon=True)
        self.thread.start()

    def percent(self) -> float:
        return round(100.0 * self.done / max(self.total, 1), 2)

    def __call__(self, acct: Accounting) -> None:
        self.done = acct.resumed + acct.answers + acct.failures
        if self.bar.update(self.done - self.bar.n):  # True when the bar redrew (at most once a second)
            self.bar.set_postfix(retries=acct.retries, failed=acct.failures, refresh=False)

    def _publish(self) -> None:
        while not self.stopped.wait(PROGRESS_EVERY_S):
            update_progress_artifact(self.artifact, progress=self.percent())

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        update_progress_artifact(self.artifact, progress=self.percent())
        self.bar.close()


def api_answers(section: GenerationSection, model: str, rows: list[dict], folder: Path, on_progress=None
                ) -> tuple[list[dict], list[dict], Accounting]:
    """Ask for every (row, sample) the shards in ``folder`` do not answer yet; return all answers and the
    failures for good. ``model``: the served model name (backend openai), or the model folder vLLM serves."""
    answered, _ = read_shards(folder)
    todo = [r for r in rows if (str(r["id"]), r["sample"]) not in answered]
    s = Sampling(model=model, max_tokens=section.max_new_tokens, temperature=section.temperature, top_p=section.top_p,
                 seed=section.seed, logprobs=section.logprobs, endpoint=section.api.endpoint,
                 token_ids=section.api.token_ids or section.backend is Backend.vllm)
    requests = (teacher_request(r, r["sample"], r["teacher_prompt"], section.system_prompt, section.api.endpoint)
                for r in todo)
    run = {"concurrency": section.api.concurrency, "max_retries": section.api.max_retries, "seed": section.seed or 0,
           "on_progress": on_progress, "resumed": len(rows) - len(todo)}
    if not todo:  # all answered before a crash: no server to start, nothing to ask
        acct = Accounting(resumed=len(rows))
    else:
        with ShardWriter(folder) as shard:
            run["on_record"] = shard.append
            if section.backend is Backend.vllm:
                v = section.vllm
                with vllm_server(model, port=v.port, extra_args=v.server_args(), python=v.python,
                                 startup_timeout_s=v.startup_timeout_s) as base_url:
                    acct = run_all(base_url, None, section.api.timeout_s, requests, s, **run)
            else:
                acct = run_all(section.api.base_url, api_key(section), section.api.timeout_s, requests, s, **run)
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
        "a rerun asks only for the failed and missing ones")


def answer_table(rows: list[dict], records: list[dict]) -> pd.DataFrame:
    """One row per (row, sample) answered: the row's fields, the prompt a student trains on, the answer."""
    by_key = {(str(r["id"]), r["sample"]): r for r in rows}
    out = []
    for rec in records:
        row = by_key[(str(rec["id"]), rec["sample"])]
        logprobs = rec.get("logprobs") or {}
        out.append({**{k: v for k, v in row.items() if k != "teacher_prompt"},
                    "text": rec["text"], "finish_reason": rec["finish_reason"],
                    "completion_tokens": rec["completion_tokens"], "prompt_tokens": rec.get("prompt_tokens"),
                    **logprobs})
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
    out = [{**{k: v for k, v in by_key[(str(f["id"]), f["sample"])].items() if k != "teacher_prompt"},
            **{k: f.get(k) for k in ("reason", "status", "error", "attempts", "raw")}} for f in failed]
    return pd.DataFrame(out, columns=columns if not out else None)


def run_name(parameters: dict) -> str:
    """``generate_answers[openai gpt-4o-mini]``, ``[vllm]``, ``[hf]``: the backend, and the model an API names."""
    section = parameters["section"]
    model = section.api.model if section.backend is Backend.openai else None
    return f"generate_answers[{section.backend.value}{' ' + model if model else ''}]"


@task(cache_policy=StageCache(GENERATE), **STAGE_RESULTS, retries=2, retry_delay_seconds=10,
      retry_condition_fn=_no_retry_on_verdicts, task_run_name=run_name)
def generate_answers(run_dir: Path, section: GenerationSection, template: str, teacher: OutputRef,
                     data: OutputRef) -> OutputRef:
    """``template``: the recipe's CoT prompt, used unless ``section.template`` names another one."""
    out = GENERATE.output(run_dir, section=section, template=template, teacher=teacher, data=data)
    if out.done:
        return out.done
    rows = prompted_rows(section, section.template_text or template, data)
    folder = shard_folder(run_dir, out.key)
    if section.backend is Backend.hf:
        (answered, acct), failed = hf_answers(section, teacher, rows), []
    else:
        already = len(read_shards(folder)[0])
        progress = Progress(len(rows), already)
        try:
            # A local vLLM server serves the teacher's folder under its path; a remote API may name it otherwise.
            local = section.backend is Backend.vllm
            model = model_location(teacher) if local else section.api.model or model_location(teacher)
            answered, failed, acct = api_answers(section, model, rows, folder, progress)
        finally:
            progress.close()
    check_failures(failed, len(rows), section, folder)
    answers = answer_table(rows, answered)
    failures = failure_table(rows, failed)
    with out.building() as tmp:
        answers.to_parquet(tmp / "answers.parquet", index=False)
        failures.to_parquet(tmp / "failures.parquet", index=False)
        tokens = int(answers["completion_tokens"].fillna(0).sum()) if len(answers) else 0
        out.finish(tmp, rows=len(answers), failed=len(failures), backend=section.backend.value,
                   accounting=acct.as_dict(), completion_tokens=tokens)
    shutil.rmtree(folder, ignore_errors=True)  # everything it held is in the output now
    create_table_artifact(key="teacher-accounting", table=[{"figure": k, "value": v} for k, v in acct.as_dict().items()],
                          description=f"teacher requests ({section.backend.value}): answers, failures, tokens, time")
    return out.ref()
