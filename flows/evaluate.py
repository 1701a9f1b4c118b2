"""Evaluation and the report alone, on an existing run folder: the run's teacher and the latest output of
each student the recipe names, evaluated and measured back to back, then report.md / report.json.

    python -m flows.evaluate recipes/demo.yaml [RUN_DIR]
"""

from __future__ import annotations

from prefect import flow

from flows.chain import check_api_keys, evaluate_and_report, recipe_and_run, run_teacher, starting_points
from flows.cli import run_as_script
from kdflow.logit_cache import interop
from kdflow.store import run_folder
from tasks.capture import CAPTURE, JOIN_CACHES


# No log_prints (see flows/distill.py).
@flow(name="evaluate")
def evaluate(recipe: str = "recipes/demo.yaml", run_dir: str | None = None) -> dict:
    """``run_dir``: the run folder to take inputs from and write to (default: the recipe's). Returns the report."""
    r, run = recipe_and_run(recipe, run_dir)
    # The judge's key (and an API teacher's: it answers the test questions), before any model is evaluated.
    check_api_keys(r.generation if r.teacher.api else None, judge=r.evaluation.judge)
    imported = r.logit_cache is not None and r.logit_cache.imported  # then the teacher answered nothing: no curation
    data, teacher = run_folder.latest(run, "data"), run_teacher(run, r)
    curated = None if imported else run_folder.latest(run, "curate")
    starts = starting_points(run, r, teacher, data)  # the pruned floors (cached: found, not made again)
    models = {
        "teacher": teacher,
        **starts.floors,
        **{s.name: run_folder.latest(run, "students", s.name) for s in r.student_runs()},
    }
    # the preflight the distill flow ran on this teacher, listed in the report (several teachers: not told apart here)
    checked = run_folder.outputs(run, "preflight") if not r.teachers else []
    preflight = {"teacher": checked[-1]} if checked else {}
    # the logit cache the students read, which the report names (none in the folder: the report says nothing of it)
    stage = interop.STAGE if imported else JOIN_CACHES.name if r.teachers else CAPTURE.name
    caches = run_folder.outputs(run, stage) if r.logit_cache is not None else []
    logits = caches[-1] if caches else None
    return evaluate_and_report(run, r, models, data, curated, starts.floor_info, preflight=preflight, logits=logits)


if __name__ == "__main__":
    run_as_script("evaluate")  # the same arguments and --help as `kdflow evaluate`
