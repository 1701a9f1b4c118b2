"""The generate stage alone, on an existing run folder: the teacher answers with the recipe's generation
settings, from the run's finished data and teacher outputs (found by their manifests, not recomputed).

    python -m flows.generate recipes/demo.yaml [RUN_DIR]
"""

from __future__ import annotations

from prefect import flow

from flows.chain import check_api_keys, routed_answers
from flows.cli import run_as_script
from flows.lookups import found, recipe_and_run, run_teacher, run_teachers
from kdflow.store.outputs import OutputRef
from tasks.data import DATA
from tasks.generate import generate_answers


# No log_prints (see flows/distill.py).
@flow(name="generate")
def generate(recipe: str = "recipes/demo.yaml", run_dir: str | None = None) -> OutputRef:
    """``run_dir``: the run folder to take inputs from and write to (default: the recipe's)."""
    r, run = recipe_and_run(recipe, run_dir)
    check_api_keys(r.generation)  # a missing key fails now, naming it, not as a 401 mid-stage
    data = found(run, DATA, section=r.data)  # the recipe's data, not the newest
    if r.teachers:  # each teacher answers the rows routed to it, joined as the distill flow joins them
        for own in (t.generation for t in r.teachers if t.generation is not None):
            check_api_keys(own)  # a teacher with a generation section of its own: its API key too
        return routed_answers(run, r, run_teachers(run, r, data), data)
    return generate_answers(run, r.generation, r.prompts.cot_text(), run_teacher(run, r, data), data)


if __name__ == "__main__":
    run_as_script("generate")  # the same arguments and --help as `kdflow generate`
