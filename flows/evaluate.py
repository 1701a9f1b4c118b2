"""Evaluation and the report alone, on an existing run folder: the run's teacher and the latest output of
each student the recipe names, evaluated and measured back to back, then report.md / report.json.

    python -m flows.evaluate recipes/demo.yaml [RUN_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from kdflow.store import run_folder
from kdflow.config.recipe import load_recipe
from tasks.evaluate import evaluate_model, judge_students, measure_deployment, run_lm_eval
from tasks.report import write_report


# No log_prints (see flows/distill.py).
@flow(name="evaluate")
def evaluate(recipe: str = "recipes/demo.yaml", run_dir: str | None = None) -> dict:
    """``run_dir``: the run folder to take inputs from and write to (default: the recipe's). Returns the report."""
    r = load_recipe(recipe)
    run, cot = Path(run_dir) if run_dir else r.run_dir, r.prompts.cot_text()
    data, teacher, curated = (run_folder.latest(run, stage) for stage in ("data", "teacher", "curate"))
    models = {"teacher": teacher, **{s.name: run_folder.latest(run, "students", s.name) for s in r.student_runs()}}
    evaluations = {name: evaluate_model(run, r.evaluation, cot, r.data.source, model, teacher, data)
                   for name, model in models.items()}
    deployment = measure_deployment(run, models, r.evaluation.deployment, cot, data, r.evaluation.split)
    benchmarks = run_lm_eval(run, models, r.evaluation.lm_eval)
    judged = (judge_students(run, r.evaluation.judge, {s.name: evaluations[s.name] for s in r.student_runs()},
                             evaluations["teacher"], data, r.evaluation.split) if r.evaluation.judge else None)
    return write_report(run, r.run.name, models, evaluations, deployment, benchmarks,
                        {s.name: s.summary() for s in r.student_runs()}, curated, judged)


if __name__ == "__main__":
    print(evaluate(*sys.argv[1:3])["students"])
