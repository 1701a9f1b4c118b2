"""The curate stage alone, on an existing run folder: the recipe's filters over the teacher answers the
recipe's settings key (the judge filter asks the run's teacher).

    python -m flows.curate recipes/demo.yaml [RUN_DIR]
"""

from __future__ import annotations

from prefect import flow

from flows.cli import run_as_script
from flows.lookups import found, found_answers, recipe_and_run, run_teacher
from kdflow.store.outputs import OutputRef
from tasks.curate import filter_answers
from tasks.data import DATA


# No log_prints (see flows/distill.py).
@flow(name="curate")
def curate(recipe: str = "recipes/demo.yaml", run_dir: str | None = None) -> OutputRef:
    """``run_dir``: the run folder to take inputs from and write to (default: the recipe's)."""
    r, run = recipe_and_run(recipe, run_dir)
    teacher = run_teacher(run, r)
    data = found(run, DATA, section=r.data)  # the outputs this recipe keys, not the newest (flows/lookups.py found)
    answers = found_answers(run, r, teacher, data)  # several teachers: their joined answers
    return filter_answers(run, r.filters, r.data.source, answers, teacher)


if __name__ == "__main__":
    run_as_script("curate")  # the same arguments and --help as `kdflow curate`
