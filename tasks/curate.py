"""Stage 3: curate the teacher's answers (verified answers, the recipe's filters); every drop is kept with its
reasons in dropped.parquet, and report.md / report.json / lengths.png say what went and why."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact

from data.checkers import answer_checker
from kdflow.config.data import DataSource
from kdflow.config.filters import FiltersSection
from kdflow.config.generation import Backend
from kdflow.curation import drop_report
from kdflow.curation.answers import token_counts
from kdflow.curation.pipeline import DROPPED, KEPT, curate, reason_counts
from kdflow.store.data_files import save_rows
from kdflow.store.model_folders import folder_sha256, model_location
from kdflow.store.outputs import OutputRef
from kdflow.store.stage import Stage
from kdflow.teacher.completion import TeacherBackend
from kdflow.teacher.generation import ANSWERS, FAILURES
from tasks.caching import STAGE_RESULTS, StageCache


def length_tokenizer(section: FiltersSection) -> dict:
    """The length filter's tokenizer by its files where it is a local folder (another tokenizer put at the same path
    counts other lengths: the tenth audit's #41), {} otherwise (a hub id, or none: every other key as it was)."""
    name = section.length.tokenizer if section.length else None
    if not name or not Path(name).is_dir():
        return {}
    return {"length_tokenizer": f"sha256:{folder_sha256(Path(name))}"}


# The judge filter's template is read from its file here, so that Prefect's key (computed from the task's
# arguments) sees an edit of the prompt too, not only the body.
CURATE = Stage(
    "curate",
    "2",
    lambda section, source, answers, teacher=None: {
        "section": section,
        "source": source.value,
        "answers": answers,
        "teacher": teacher,
        "judge_template": section.judge.template_text() if section.judge else None,
        **length_tokenizer(section),
    },
    files=(KEPT, DROPPED, *drop_report.FILES),
)


@task(cache_policy=StageCache(CURATE), **STAGE_RESULTS, task_run_name="filter_answers[{source.value}]")
def filter_answers(
    run_dir: Path, section: FiltersSection, source: DataSource, answers: OutputRef, teacher: OutputRef | None = None
) -> OutputRef:
    """``teacher`` is needed only by the LLM-judge filter (it answers the judge template)."""
    out = CURATE.output(run_dir, section=section, source=source, answers=answers, teacher=teacher)
    if done := out.done:
        return done
    judge_template = out.inputs["judge_template"]
    rows = pd.read_parquet(Path(answers.path) / ANSWERS).to_dict("records")
    complete = None
    if section.judge is not None:
        if teacher is None:
            raise ValueError("filters.judge is set but no teacher was passed to the curate stage")
        # The HF teacher judges (an API backend would plug in through the same TeacherBackend).
        judge = TeacherBackend(Backend.hf, model_location(teacher), batch_size=section.judge_batch_size)
        complete = judge.completer(section.judge.max_new_tokens)
    check, extract = answer_checker(source)
    kept, dropped = curate(rows, section, check, extract, token_counts(rows, section), judge_template, complete)
    counts = reason_counts(dropped)
    # Requests that failed for good never became answers; the generate stage keeps them, this stage counts them.
    failures_file = Path(answers.path) / FAILURES
    failed = len(pd.read_parquet(failures_file)) if failures_file.is_file() else 0
    columns = list(rows[0]) if rows else ["id", "question", "answer", "text", "finish_reason"]
    with out.building() as tmp:
        save_rows(kept, columns, tmp / KEPT)
        save_rows(dropped, [*columns, "reasons", "detail"], tmp / DROPPED)
        report = drop_report.write(tmp, kept, dropped)
        out.finish(
            tmp,
            rows=len(kept),
            input_rows=len(rows),
            kept=len(kept),
            dropped=len(dropped),
            drop_reasons=counts,
            teacher_failures=failed,
            length_histogram=report["length_histogram"],
        )
    create_table_artifact(
        key="curate-drops",
        table=[
            *report["reasons"],
            {
                "reason": "(kept)",
                "rows": len(kept),
                "only": None,
                "% of input": round(100 * len(kept) / max(len(rows), 1), 2),
            },
        ],
        description=f"Teacher answers kept and dropped by reason, out of {len(rows)} "
        f"({failed} teacher requests failed for good: see the generate stage's {FAILURES}); "
        f"every drop is in {Path(out.ref().path) / DROPPED}",
    )
    return out.ref()
