"""Train the teacher (or take the one the recipe names, or record the API model that is the teacher): the source's
first step, runnable alone.

    python -m flows.train_teacher recipes/demo.yaml
"""

from __future__ import annotations


from prefect import flow

from flows.cli import run_as_script

from kdflow.store.outputs import OutputRef
from kdflow.config.recipe import load_recipe
from kdflow.models.gguf import is_gguf_path
from tasks.data import make_data
from tasks.models import import_gguf_model
from tasks.teacher import record_api_teacher, train_teacher_model, use_existing_teacher


# No log_prints (see flows/distill.py).
@flow(name="train-teacher")
def train_teacher(recipe: str = "recipes/demo.yaml") -> OutputRef:
    r = load_recipe(recipe)
    if is_gguf_path(r.teacher.model):  # dequantized once into a Hugging Face folder that every backend reads
        return import_gguf_model(r.run_dir, r.teacher.model, r.teacher.dtype)
    if r.teacher.model:
        return use_existing_teacher(r.run_dir, r.teacher)
    data = make_data(r.run_dir, r.data)
    if r.teacher.api:  # black-box: the API answers; only the students' shared tokenizer is made here
        return record_api_teacher(r.run_dir, r.teacher, r.generation.api, data, r.prompts.cot_text())
    return train_teacher_model(r.run_dir, r.teacher, data, r.prompts.cot_text())


if __name__ == "__main__":
    run_as_script("teacher")  # the same arguments and --help as `kdflow teacher`
