"""Train the teacher (or take the one the recipe names, or record the API model that is the teacher): the source's
first step, runnable alone.

    python -m flows.train_teacher recipes/demo.yaml
"""

from __future__ import annotations

from prefect import flow, tags

from flows.cli import run_as_script
from kdflow.config.kd import OnPolicyKD
from kdflow.config.recipe import Recipe, load_recipe
from kdflow.config.teachers import NamedTeacher, RowMatch
from kdflow.models.gguf import is_gguf_path
from kdflow.store.outputs import OutputRef
from tasks.data import make_data
from tasks.models import import_gguf_model
from tasks.teacher import record_api_teacher, record_imported_teacher, train_teacher_model, use_existing_teacher


def teacher_chain(r: Recipe, data: OutputRef | None = None, train_on: RowMatch | None = None) -> OutputRef:
    """The teacher as the parsed recipe ``r`` says, the same tasks (and keys) for this flow and flows/chain.upstream:
    a GGUF file imported, a named model recorded, the API model recorded, or a teacher trained on ``data`` (made here
    when the caller has not made it already)."""
    if r.teacher.imported:  # only its logits are here, in the imported dataset
        return record_imported_teacher(r.run_dir, r.teacher)
    if is_gguf_path(r.teacher.model):  # dequantized once into a Hugging Face folder that every backend reads
        return import_gguf_model(r.run_dir, r.teacher.model, r.teacher.dtype)
    if r.teacher.model:
        return use_existing_teacher(r.run_dir, r.teacher)
    if data is None:
        data = make_data(r.run_dir, r.data)
    if r.teacher.api:  # black-box: the API answers; only the students' shared tokenizer is made here
        return record_api_teacher(r.run_dir, r.teacher, r.generation.api, data, r.prompts.cot_text())
    return train_teacher_model(r.run_dir, r.teacher, data, r.prompts.cot_text(), train_on)


def as_teacher(r: Recipe, t: NamedTeacher) -> Recipe:
    """The recipe as one of its routed teachers sees it: that teacher, its own generation section, and on-policy
    students scored by vLLM asking its own server (``served``), so that its preflight checks that server."""
    students = r.students
    if t.served is not None:
        served = {"base_url": t.served.base_url}
        students = [
            s.model_copy(update={"kd": s.kd.model_copy(update=served)}) if scored_by_vllm(s) else s for s in students
        ]
    return r.model_copy(
        update={"teacher": t.section(), "generation": t.generation or r.generation, "students": students}
    )


def scored_by_vllm(s) -> bool:
    return isinstance(s.kd, OnPolicyKD) and s.kd.teacher_backend == "vllm"


def named_teachers(r: Recipe, data: OutputRef | None = None) -> dict[str, OutputRef]:
    """Each of the recipe's ``teachers`` by name, made as ``teacher_chain`` makes one (a trained one on its
    ``train_on`` rows), each task run named after it."""
    if data is None:
        data = make_data(r.run_dir, r.data)
    out = {}
    for t in r.teachers:
        with tags(f"teacher:{t.name}"):
            out[t.name] = teacher_chain(as_teacher(r, t), data, t.train_on)
    return out


# No log_prints (see flows/distill.py).
@flow(name="train-teacher")
def train_teacher(recipe: str = "recipes/demo.yaml") -> OutputRef:
    r = load_recipe(recipe)
    return named_teachers(r)[r.routing.default] if r.teachers else teacher_chain(r)


if __name__ == "__main__":
    run_as_script("teacher")  # the same arguments and --help as `kdflow teacher`
