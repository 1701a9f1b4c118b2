"""The teacher preflight alone: the data and the teacher (cached, as the whole flow makes them), then every check the
recipe relies on (kdflow/evaluation/preflight.py), before any spend. The whole flow runs the same stage before the
teacher's answers (flows/chain.upstream); a failed check stops either with its cause and fix.

    python -m flows.preflight recipes/demo.yaml        # or: kdflow preflight recipes/demo.yaml
"""

from __future__ import annotations

from prefect import flow

from flows.chain import check_api_keys
from flows.cli import run_as_script
from flows.train_teacher import as_teacher, named_teachers, teacher_chain
from kdflow.config.recipe import load_recipe
from kdflow.store.outputs import OutputRef
from tasks.data import make_data
from tasks.preflight import teacher_preflight


# No log_prints (see flows/distill.py).
@flow(name="preflight")
def preflight(recipe: str = "recipes/demo.yaml") -> OutputRef | dict[str, OutputRef]:
    """The preflight's output; with several teachers (``teachers:``), each one's by name."""
    r = load_recipe(recipe)  # a bad recipe fails here, before any work
    check_api_keys(r.generation)
    data = make_data(r.run_dir, r.data)
    if r.teachers:
        made = named_teachers(r, data)
        return {t.name: teacher_preflight(as_teacher(r, t), made[t.name], data, t.name) for t in r.teachers}
    return teacher_preflight(r, teacher_chain(r, data), data)


if __name__ == "__main__":
    run_as_script("preflight")  # the same arguments and --help as `kdflow preflight`
