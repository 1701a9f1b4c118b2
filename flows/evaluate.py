"""Evaluation and the report alone, on an existing run folder: the run's teacher and each student as the recipe
trains it (the output its settings key: a student edited since it was trained is missing, not another model),
evaluated and measured back to back, then report.md / report.json.

    python -m flows.evaluate recipes/demo.yaml [RUN_DIR]
"""

from __future__ import annotations

from prefect import flow

from flows.chain import check_api_keys, evaluate_and_report, starting_points
from flows.cli import run_as_script
from flows.lookups import found_upstream, recipe_and_run, run_preflights, run_teacher, trained_students
from kdflow.store import run_folder
from kdflow.training.student import needs_logit_cache


# No log_prints (see flows/distill.py).
@flow(name="evaluate")
def evaluate(recipe: str = "recipes/demo.yaml", run_dir: str | None = None) -> dict:
    """``run_dir``: the run folder to take inputs from and write to (default: the recipe's). Returns the report."""
    r, run = recipe_and_run(recipe, run_dir)
    # The judge's key (and an API teacher's: it answers the test questions), before any model is evaluated.
    check_api_keys(r.generation if r.teacher.api else None, judge=r.evaluation.judge)
    imported = r.logit_cache is not None and r.logit_cache.imported  # then the teacher answered nothing: no curation
    teacher = run_teacher(run, r)
    # Each output the recipe keys, not the newest of its name: an edited and reverted recipe's models are not its own
    needs = any(needs_logit_cache(s) for s in r.students)
    try:  # the recipe's logit cache, which the report names even where no student reads it
        up = found_upstream(run, r, teacher, curated=not imported, logits=needs or r.logit_cache is not None)
    except run_folder.MissingStage:
        if needs:
            raise
        up = found_upstream(run, r, teacher, curated=not imported, logits=False)  # none here: the report names none
    data, curated = up.data, up.curated
    starts = starting_points(run, r, teacher, data)  # the pruned floors (cached: found, not made again)
    models = {
        "teacher": teacher,
        **starts.floors,
        **trained_students(run, starts.students, r.prompts.cot_text(), up, up.routed(r)),
    }
    # the preflight the distill flow ran on each teacher and the logit cache the students read, which the report
    # lists: this recipe's where the folder has them, else nothing
    return evaluate_and_report(
        run,
        r,
        models,
        data,
        curated,
        starts.floor_info,
        routed=up if r.teachers else None,  # several teachers: each evaluated, as the distill flow's report has them
        preflight=run_preflights(run, r, up),
        logits=up.logits,
    )


if __name__ == "__main__":
    run_as_script("evaluate")  # the same arguments and --help as `kdflow evaluate`
