"""The students alone, on an existing run folder ("retrain the students of run X with a new loss"): every
student of the recipe, trained on the run's finished data, teacher and curated answers.

    python -m flows.train_students recipes/demo.yaml [RUN_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from kdflow.store import run_folder
from kdflow.store.outputs import OutputRef
from kdflow.config.recipe import StudentData, load_recipe
from kdflow.training.student import student_inputs
from tasks.students import train_student


# No log_prints (see flows/distill.py).
@flow(name="train-students")
def train_students(recipe: str = "recipes/demo.yaml", run_dir: str | None = None) -> dict[str, OutputRef]:
    """``run_dir``: the run folder to take inputs from and write to (default: the recipe's)."""
    r = load_recipe(recipe)
    run, cot = Path(run_dir) if run_dir else r.run_dir, r.prompts.cot_text()
    data, teacher = run_folder.latest(run, "data"), run_folder.latest(run, "teacher")
    # Only a student that learns from the teacher's answers needs the curate stage (as in flows/distill.py).
    curated = run_folder.latest(run, "curate") if any(s.data is StudentData.teacher for s in r.students) else None
    logits = run_folder.latest(run, "logit-cache") if any(s.kd for s in r.students) else None
    return {s.name: train_student(run, s, cot, teacher, data, *student_inputs(s, curated, logits))
            for s in r.student_runs()}


if __name__ == "__main__":
    print(train_students(*sys.argv[1:3]))
