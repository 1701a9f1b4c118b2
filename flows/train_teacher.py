"""Train the teacher (or take the one the recipe names, or record the API model that is the teacher): the source's
first step, runnable alone.

    python -m flows.train_teacher recipes/demo.yaml
"""

from __future__ import annotations

from prefect import flow

from flows.cli import run_as_script
from kdflow.config.recipe import Recipe, load_recipe
from kdflow.models.gguf import is_gguf_path
from kdflow.store.outputs import OutputRef
from tasks.data import make_data
from tasks.models import import_gguf_model
from tasks.teacher import record_api_teacher, train_teacher_model, use_existing_teacher


def teacher_chain(r: Recipe, data: OutputRef | None = None) -> OutputRef:
    """The teacher as the parsed recipe ``r`` says, the same tasks (and keys) for this flow and flows/chain.upstream:
    a GGUF file imported, a named model recorded, the API model recorded, or a teacher trained on ``data`` (made here
    when the caller has not made it already)."""
    if is_gguf_path(r.teacher.model):  # dequantized once into a Hugging Face folder that every backend reads
        return import_gguf_model(r.run_dir, r.teacher.model, r.teacher.dtype)
    if r.teacher.model:
        return use_existing_teacher(r.run_dir, r.teacher)
    if data is None:
        data = make_data(r.run_dir, r.data)
    if r.teacher.api:  # black-box: the API answers; only the students' shared tokenizer is made here
        return record_api_teacher(r.run_dir, r.teacher, r.generation.api, data, r.prompts.cot_text())
    return train_teacher_model(r.run_dir, r.teacher, data, r.prompts.cot_text())


# No log_prints (see flows/distill.py).
@flow(name="train-teacher")
def train_teacher(recipe: str = "recipes/demo.yaml") -> OutputRef:
    return teacher_chain(load_recipe(recipe))


if __name__ == "__main__":
    run_as_script("teacher")  # the same arguments and --help as `kdflow teacher`
