"""The preflight stage: the teacher checked against what the recipe relies on (kdflow/evaluation/preflight.py) once it
exists and before anything is generated, captured or trained. A failure stops the flow with each failed check's cause
and fix; its report is kept in the run folder either way (``preflight.json``) and shown as a Prefect artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from kdflow.config.fields import redact_url
from kdflow.config.generation import GenerationSection
from kdflow.config.logit_cache import LogitCacheSection
from kdflow.config.recipe import Recipe
from kdflow.config.student import StudentSection
from kdflow.evaluation import preflight as checks
from kdflow.evaluation.preflight_probes import TeacherProbes, make_plan, run_checks, student_needs
from kdflow.store.model_folders import model_location
from kdflow.store.outputs import OutputRef
from kdflow.store.run_folder import read_split
from kdflow.store.stage import Stage
from kdflow.teacher.prompts import teacher_request
from tasks.api_keys import generation_api_key
from tasks.artifacts import artifact_key
from tasks.caching import STAGE_RESULTS, StageCache

REPORT = checks.REPORT_JSON
# The servers' addresses are in the key, though they are throughput fields of their sections: the preflight checks
# the server at that address, and a pass there says nothing of another. A student's training knobs are not: only
# what the checks read of it (its model, its KD method and where that scores).
PREFLIGHT = Stage(
    "preflight",
    "1",
    lambda generation, logit_cache, students, teacher, data, template, api_teacher: {
        "generation": generation,
        "logit_cache": logit_cache,
        "logit_cache_server": redact_url(logit_cache.base_url) if logit_cache else None,
        "students": [student_needs(s) for s in students],
        "teacher": teacher,
        "data": data,
        "template": template,
        "api_teacher": api_teacher,
        "checks": {"tolerance": checks.TOLERANCE, "repeats": checks.REPEATS},
    },
    files=(REPORT,),
)


def sample_request(generation: GenerationSection, template: str, data: OutputRef) -> tuple[list[dict], str]:
    """One request as the teacher sees it (the first row of the first split it answers, zero-shot), and the row's gold
    answer to score where the teacher's own is not at hand."""
    from kdflow.teacher.prompts import zero_shot

    row = read_split(data, generation.splits[0])[0]
    request = teacher_request(row, 0, zero_shot(template, row), generation.system_prompt, generation.api.endpoint)
    messages = request.messages or [{"role": "user", "content": request.prompt}]
    gold = next((row[c] for c in ("rationale", "reference", "answer") if isinstance(row.get(c), str)), "")
    return messages, gold


@task(cache_policy=StageCache(PREFLIGHT), **STAGE_RESULTS, task_run_name="preflight[{generation.backend.value}]")
def run_preflight(
    run_dir: Path,
    generation: GenerationSection,
    logit_cache: LogitCacheSection | None,
    students: list[StudentSection],
    teacher: OutputRef,
    data: OutputRef,
    template: str,
    api_teacher: bool,
) -> OutputRef:
    """``students``: the recipe's own (not one per seed); ``template``: the prompt template the teacher is asked
    with. Raises ``PreflightFailed`` (nothing finished, so a rerun checks again) when a check fails."""
    args = dict(generation=generation, logit_cache=logit_cache, students=students, teacher=teacher, data=data)
    out = PREFLIGHT.output(run_dir, **args, template=template, api_teacher=api_teacher)
    if done := out.done:
        return done
    location = model_location(teacher)
    messages, gold = sample_request(generation, template, data)
    plan = make_plan(
        None if api_teacher else location,
        location,
        generation,
        logit_cache,
        students,
        messages,
        gold,
        lambda: generation_api_key(generation),
    )
    with TeacherProbes() as probes:
        found = run_checks(plan, probes)
    create_markdown_artifact(
        key=artifact_key("preflight"), markdown=checks.markdown(found), description="the teacher preflight"
    )
    if not checks.passed(found):
        failed = Path(run_dir) / PREFLIGHT.name / f"failed-{out.key[:16]}.json"  # no manifest: a rerun checks again
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(checks.dumps(found))
        checks.raise_on_failure(found, f" (report: {failed})")
    with out.building() as tmp:
        (tmp / REPORT).write_text(checks.dumps(found))
        counts = checks.report(found)["counts"]
        out.finish(tmp, checks=len(found), **counts)
    return out.ref()


def preflight_args(r: Recipe, teacher: OutputRef, data: OutputRef) -> dict:
    """``run_preflight``'s arguments (and so its key) for the parsed recipe ``r``: what a stage rerun alone looks up
    (flows/chain.py) and ``teacher_preflight`` runs, written once."""
    return dict(
        generation=r.generation,
        logit_cache=r.logit_cache,
        students=r.students,
        teacher=teacher,
        data=data,
        template=r.generation.template_text or r.prompts.cot_text(),
        api_teacher=r.teacher.api,
    )


def teacher_preflight(r: Recipe, teacher: OutputRef, data: OutputRef, name: str | None = None) -> OutputRef:
    """The preflight of the parsed recipe ``r`` once its teacher and data exist: what flows/chain.upstream runs before
    the teacher's answers, and ``kdflow preflight`` alone. The template is the one the teacher is asked with; ``name``:
    one of several routed teachers (``r`` as that teacher sees it), which names the task run."""
    task = run_preflight.with_options(task_run_name=f"preflight[{name}]") if name else run_preflight
    return task(r.run_dir, **preflight_args(r, teacher, data))
