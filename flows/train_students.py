"""The students alone, on an existing run folder ("retrain the students of run X with a new loss"): every
student of the recipe, trained on the run's finished data, teacher and curated answers.

    python -m flows.train_students recipes/demo.yaml [RUN_DIR]
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.chain import starting_points, train_in_order
from flows.cli import run_as_script
from flows.lookups import found_upstream, recipe_and_run, run_teacher, run_teachers
from kdflow.config.recipe import Recipe
from kdflow.config.student import StudentSection
from kdflow.store.outputs import OutputRef
from kdflow.teacher.routing import RoutedTeachers
from kdflow.training.student import (
    needs_curated,
    needs_logit_cache,
    needs_routed_teachers,
    trains_on_imported_rows,
)


def inputs_from_run(
    run: Path, r: Recipe, students: list[StudentSection]
) -> tuple[OutputRef, OutputRef, OutputRef | None, OutputRef | None]:
    """(data, teacher, curated answers, logit cache) from the run folder's finished outputs: the curated answers
    only when a student learns from them (not from an imported cache's own rows), the logit cache (captured or
    imported) only when one trains offline from it."""
    teacher = run_teacher(run, r)
    offline = any(needs_logit_cache(s) for s in students)
    # Each the output the recipe keys (flows/lookups.py found), not the newest of the stage: after an edited filter and
    # its revert, the newest curation is the edited recipe's.
    logits = found_upstream(run, r, teacher, curated=False, logits=offline).logits
    answers = any(needs_curated(s) and not trains_on_imported_rows(s, logits) for s in students)
    up = found_upstream(run, r, teacher, curated=answers, logits=False)
    return up.data, teacher, up.curated, logits


# No log_prints (see flows/distill.py).
@flow(name="train-students")
def train_students(recipe: str = "recipes/demo.yaml", run_dir: str | None = None) -> dict[str, OutputRef]:
    """``run_dir``: the run folder to take inputs from and write to (default: the recipe's)."""
    r, run = recipe_and_run(recipe, run_dir)
    cot = r.prompts.cot_text()
    data, teacher, curated, logits = inputs_from_run(run, r, r.students)
    starts = starting_points(run, r, teacher, data)  # students pruned from the teacher or named by a GGUF file
    return train_in_order(run, starts.students, cot, teacher, data, curated, logits, routed_from_run(run, r, data))


def routed_from_run(run: Path, r: Recipe, data: OutputRef) -> RoutedTeachers | None:
    """Several teachers, for the on-policy students they score: each the output its own stage key names in ``run``
    (found, as every other input here: a copied or moved run folder too); None with one teacher or no such
    student."""
    if not r.teachers or not any(needs_routed_teachers(s) for s in r.students):
        return None
    return RoutedTeachers.of(r, run_teachers(run, r, data))


if __name__ == "__main__":
    run_as_script("students")  # the same arguments and --help as `kdflow students`
