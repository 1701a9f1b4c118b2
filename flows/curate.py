"""The curate stage alone, on an existing run folder: the recipe's filters over the run's latest teacher
answers (the judge filter asks the run's teacher).

    python -m flows.curate recipes/demo.yaml [RUN_DIR]
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.cli import run_as_script

from kdflow.store import run_folder
from kdflow.store.outputs import OutputRef
from kdflow.config.recipe import load_recipe
from tasks.curate import filter_answers


# No log_prints (see flows/distill.py).
@flow(name="curate")
def curate(recipe: str = "recipes/demo.yaml", run_dir: str | None = None) -> OutputRef:
    """``run_dir``: the run folder to take inputs from and write to (default: the recipe's)."""
    r = load_recipe(recipe)
    run = Path(run_dir) if run_dir else r.run_dir
    answers, teacher = run_folder.latest(run, "generate"), run_folder.latest(run, "teacher")
    return filter_answers(run, r.filters, r.data.source, answers, teacher)


if __name__ == "__main__":
    run_as_script("curate")  # the same arguments and --help as `kdflow curate`
