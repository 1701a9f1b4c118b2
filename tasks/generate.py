"""Stage 2: the teacher answers questions (chain-of-thought by default; the recipe may pick another template,
a system prompt, few-shot demonstrations, n samples per prompt and top-k logprobs), through the backend the recipe
names (kdflow/teacher/generation.py, kdflow/teacher/completion.py). The output has exactly one answer per
(row, sample) in ``answers.parquet``, and requests that failed for good in ``failures.parquet`` with their reason
code, error and (for a reply that was no completion) the raw body.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from tqdm import tqdm

from kdflow.config.generation import Backend, GenerationSection
from kdflow.config.teachers import Routing
from kdflow.store.model_folders import model_location
from kdflow.store.outputs import OutputRef, output_dir
from kdflow.store.stage import Stage
from kdflow.teacher.answer_shards import adopt_folder, read_shards
from kdflow.teacher.api_client import FatalApiError, RequestAccounting
from kdflow.teacher.generation import (
    ANSWERS,
    FAILURES,
    TooManyFailures,
    answer_table,
    api_answers,
    check_failures,
    failure_table,
    hf_answers,
    prompted_rows,
)
from kdflow.teacher.routing import TEACHER_COLUMN, join_tables, routed_ids, token_shares
from kdflow.teacher.vllm_server import VllmStartupError
from tasks.api_keys import generation_api_key, served
from tasks.caching import STAGE_RESULTS, StageCache

PROGRESS_EVERY_S = 2.0  # Prefect progress artifact updates: often enough to watch, rare enough to cost nothing


def shard_folder(run_dir: Path, key: str) -> Path:
    """Where answers are persisted while the stage runs (kept across crashes; removed once the output is done)."""
    return output_dir(run_dir, GENERATE.name, key).with_name(f".shards-{key[:16]}")


# Every prompt text is content: the CoT template here, the recipe's own template, few-shot template and system
# prompt inside the section (its template_text fields are computed, hence in its dump).
# ``routing`` and ``routed_to`` (one of several teachers answers the rows routed to it) are in the key only where given,
# so that a recipe with one teacher keeps its key.
GENERATE = Stage(
    "generate",
    "2",
    lambda section, template, teacher, data, routing=None, routed_to=None: {
        "section": section,
        "template": template,
        "teacher": teacher,
        "data": data,
        **served(section),
        **({"routing": routing, "routed_to": routed_to} if routing is not None else {}),
    },
    files=(ANSWERS, FAILURES),
)
# Several teachers' answers as one table (a column ``teacher`` names each row's): what the curate stage reads.
JOIN_ANSWERS = Stage("generate-routed", "1", lambda parts: {"parts": parts}, files=(ANSWERS, FAILURES))


def _no_retry_on_verdicts(task, task_run, state) -> bool:
    """Retry the task on a blip (its answers are kept), not when the API refused the key, too many rows failed or
    the vLLM server did not start (a bad flag or too little memory fails the same way again)."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, (FatalApiError, TooManyFailures, VllmStartupError))


class Progress:
    """A terminal progress bar, and a Prefect progress artifact refreshed every few seconds by a thread of its
    own: the client calls this from inside its event loop, where Prefect's sync API would not run (and an
    HTTP call per answer would slow the requests down)."""

    def __init__(self, total: int, already: int):
        self.total, self.done = total, already
        self.bar = tqdm(total=total, initial=already, desc="teacher", unit="req", mininterval=1.0)
        self.artifact = create_progress_artifact(
            progress=self.percent(), key="teacher-progress", description="teacher requests answered or failed for good"
        )
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._publish, daemon=True)
        self.thread.start()

    def percent(self) -> float:
        return round(100.0 * self.done / max(self.total, 1), 2)

    def __call__(self, acct: RequestAccounting) -> None:
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


def run_name(parameters: dict) -> str:
    """``generate_answers[openai gpt-4o-mini]``, ``[vllm]``, ``[hf]``: the backend, and the model an API names."""
    section = parameters["section"]
    model = section.api.model if section.backend is Backend.openai else None
    return f"generate_answers[{section.backend.value}{' ' + model if model else ''}]"


@task(
    cache_policy=StageCache(GENERATE),
    **STAGE_RESULTS,
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_no_retry_on_verdicts,
    task_run_name=run_name,
)
def generate_answers(
    run_dir: Path,
    section: GenerationSection,
    template: str,
    teacher: OutputRef,
    data: OutputRef,
    routing: Routing | None = None,
    routed_to: str | None = None,
) -> OutputRef:
    """``template``: the recipe's CoT prompt, used unless ``section.template`` names another one; ``routing`` and
    ``routed_to``: of several teachers, this one answers only the rows routed to it."""
    out = GENERATE.output(
        run_dir, section=section, template=template, teacher=teacher, data=data, routing=routing, routed_to=routed_to
    )
    if done := out.done:
        return done
    # Answers made before the served model's card was part of this key are taken as this model's, never asked again:
    # finished ones copied (the same files: nothing downstream reruns), a crashed run's shards moved.
    if old := out.unrecorded("served"):
        return out.adopt(old, served=out.inputs["served"])
    rows = prompted_rows(section, section.template_text or template, data)
    if routing is not None:
        mine = routed_ids(data, section.splits, routing, routed_to)
        rows = [r for r in rows if (r["split"], r["id"]) in mine]
    folder = shard_folder(run_dir, out.key)
    if "served" in out.inputs:
        adopt_folder(shard_folder(run_dir, out.key_without("served")), folder)
    if section.backend is Backend.hf:
        answered, failed, acct = hf_answers(section, model_location(teacher), rows)
    else:
        already = len(read_shards(folder)[0])
        progress = Progress(len(rows), already)
        try:
            # A local vLLM server serves the teacher's folder under its path; a remote API may name it otherwise.
            local = section.backend is Backend.vllm
            model = model_location(teacher) if local else section.api.model or model_location(teacher)
            answered, failed, acct = api_answers(
                section, model, rows, folder, progress, lambda: generation_api_key(section)
            )
        finally:
            progress.close()
    check_failures(failed, len(rows), section, folder)
    answers = answer_table(rows, answered)
    failures = failure_table(rows, failed)
    with out.building() as tmp:
        answers.to_parquet(tmp / ANSWERS, index=False)
        failures.to_parquet(tmp / FAILURES, index=False)
        tokens = int(answers["completion_tokens"].fillna(0).sum()) if len(answers) else 0
        out.finish(
            tmp,
            rows=len(answers),
            failed=len(failures),
            backend=section.backend.value,
            accounting=acct.as_dict(),
            completion_tokens=tokens,
            **{k: v for k, v in out.inputs.items() if k == "served"},
        )  # where known (else adoptable as older ones)
    shutil.rmtree(folder, ignore_errors=True)  # everything it held is in the output now
    create_table_artifact(
        key="teacher-accounting",
        table=[{"figure": k, "value": v} for k, v in acct.as_dict().items()],
        description=f"teacher requests ({section.backend.value}): answers, failures, tokens, time",
    )
    return out.ref()


@task(cache_policy=StageCache(JOIN_ANSWERS), **STAGE_RESULTS, task_run_name="join_answers")
def join_answers(run_dir: Path, parts: dict[str, OutputRef]) -> OutputRef:
    """``parts``: each routed teacher's generate output, by teacher name. Their answers and failures as one output,
    each row naming its teacher; the manifest adds up their figures and says each teacher's share of the tokens."""
    out = JOIN_ANSWERS.output(run_dir, parts=parts)
    if done := out.done:
        return done
    answers = join_tables({name: Path(ref.path) / ANSWERS for name, ref in parts.items()})
    failures = join_tables({name: Path(ref.path) / FAILURES for name, ref in parts.items()})
    manifests = {name: ref.manifest() for name, ref in parts.items()}
    accounting = {}
    for m in manifests.values():  # the figures that add up: requests, tokens, seconds
        for k, v in (m.get("accounting") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                accounting[k] = accounting.get(k, 0) + v
    by_teacher = {
        name: {
            "rows": int((answers[TEACHER_COLUMN] == name).sum()) if len(answers) else 0,
            "failed": m.get("failed", 0),
            "completion_tokens": m.get("completion_tokens", 0),
            "backend": m.get("backend"),
        }
        for name, m in manifests.items()
    }
    with out.building() as tmp:
        answers.to_parquet(tmp / ANSWERS, index=False)
        failures.to_parquet(tmp / FAILURES, index=False)
        out.finish(
            tmp,
            rows=len(answers),
            failed=len(failures),
            backend="routed: " + ", ".join(f"{n} {t['backend']}" for n, t in by_teacher.items()),
            # Not ``accounting``: the cost ledger counts each teacher's generate output already, and would count
            # their requests, tokens and seconds twice.
            parts_accounting=accounting,
            completion_tokens=sum(t["completion_tokens"] for t in by_teacher.values()),
            by_teacher=by_teacher,
            token_share=token_shares({n: t["completion_tokens"] for n, t in by_teacher.items()}),
        )
    return out.ref()
