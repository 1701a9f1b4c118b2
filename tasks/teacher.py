"""Stage 1: the teacher. Trained from scratch on the gold rationales (the source's first step: "first
train the big teacher, then distil the student from it"), an existing model named by the recipe, or the API model
``generation.api`` names (``teacher.api: true``: recorded, nothing trained or loaded), or the absent model that made
an imported logit dataset (``teacher.imported: true``: recorded, nothing here).
The shared tokenizer is trained here and saved with the teacher (or alone, for an API teacher), so from-scratch
students inherit it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from kdflow.config.generation import ApiSection
from kdflow.config.precision import check_trainable_here, training_flags, weights_dtype
from kdflow.config.teacher import TeacherSection
from kdflow.config.teachers import RowMatch
from kdflow.config.templates import render, sft_rows
from kdflow.config.training import trainer_config
from kdflow.models.model_folder import DamagedModel, weights_problem
from kdflow.store.model_folders import MODEL, SOURCE, folder_sha256, write_location
from kdflow.store.outputs import OutputRef
from kdflow.store.run_folder import read_split
from kdflow.store.stage import Stage
from kdflow.training.progress import TrainingProgress
from kdflow.training.sft import train_sft
from kdflow.training.tiny_models import count_params, llama_model, train_tokenizer
from tasks.caching import STAGE_RESULTS, StageCache
from tasks.progress import TrainingArtifact

# ``train_on`` (one of several routed teachers, kdflow/config/teachers.py) is in the key only where it is given, so a
# recipe with one teacher keeps its key.
TEACHER = Stage(
    "teacher",
    "1",
    lambda section, data, template, train_on=None: {
        "section": section,
        "data": data,
        "template": template,
        **({"train_on": train_on} if train_on is not None else {}),
    },
    files=(SOURCE, f"{MODEL}/"),
)
# A teacher named by the recipe: a local folder is keyed by its bytes (folder_sha256: hash_folder's digest, hashed
# again only when a file changed), and its output holds that digest (weights.json). What follows keys the teacher by
# its output's sha256, so new weights in place invalidate it. Version 2: version 1's output held the location alone,
# so the same sha256 for any weights at one path, and the old teacher's answers and students were reused (the tenth
# audit's #38).
WEIGHTS = "weights.json"
EXISTING_TEACHER = Stage(
    "teacher",
    "2",
    lambda section: {
        "section": section,
        "weights": folder_sha256(Path(section.model)) if Path(section.model).is_dir() else None,
    },
    files=(SOURCE, WEIGHTS),
)
# An API teacher: the model's identity (name, base_url without a password) is what it is; the tokenizer for
# from-scratch students is made from the data's gold text with the prompt template.
API_TEACHER = Stage(
    "teacher",
    "1",
    lambda section, api, data, template: {
        "section": section,
        "api": api.identity(),
        "data": data,
        "template": template,
    },
    files=(SOURCE, "tokenizer/"),
)
# A teacher that is only an imported logit dataset (``teacher.imported: true``): nothing of it is here but what the
# import stage reads, so its record holds nothing but its manifest (the report names the model the dataset records).
IMPORTED_TEACHER = Stage("teacher", "1", lambda section: {"section": section})
TOKENIZER_CORPUS_ROWS = 5000  # plenty to learn every merge of this small language


def teacher_split(data: OutputRef) -> str:
    """The teacher learns from its own split when the data has one, else from the students' gold set."""
    return "teacher" if "teacher" in data.manifest()["splits"] else "train"


def gold_tokenizer(rows: list[dict], template: str, vocab_size: int):
    """The shared BPE tokenizer, learnt from the prompts and gold rationales of the first rows."""
    corpus = [render(template, question=r["question"]) + "\n" + r["rationale"] for r in rows[:TOKENIZER_CORPUS_ROWS]]
    return train_tokenizer(corpus, vocab_size)


# No retries: a failed training run is a bug or a bad recipe, not a blip; it is not retried blindly.
@task(cache_policy=StageCache(TEACHER), **STAGE_RESULTS, task_run_name="train_teacher_model")
def train_teacher_model(
    run_dir: Path, section: TeacherSection, data: OutputRef, template: str, train_on: RowMatch | None = None
) -> OutputRef:
    """``train_on``: the teacher learns from these rows of its split only; its tokenizer is learnt from all of them,
    so that teachers trained on different rows share one tokenizer (and one logit vocabulary)."""
    out = TEACHER.output(run_dir, section=section, data=data, template=template, train_on=train_on)
    if done := out.done:
        return done
    check_trainable_here(section.dtype, "teacher")
    split = teacher_split(data)
    every = read_split(data, split)
    rows = [r for r in every if train_on.keeps({**r, "split": split})] if train_on is not None else every
    if not rows:
        raise ValueError(
            f"teacher train_on {train_on.model_dump()} keeps none of the {len(every)} rows of split {split!r}: "
            "widen its values"
        )
    with out.building() as tmp:
        start = time.perf_counter()
        tokenizer = gold_tokenizer(every, template, section.vocab_size)
        a = section.architecture
        model = llama_model(tokenizer, a.hidden, a.layers, a.heads, a.intermediate, seed=section.seed)
        if section.dtype is not None:
            model = model.to(weights_dtype(section.dtype))
        # Progress lines naming the teacher in the terminal, and the artifact training-teacher.
        progress = TrainingProgress(TEACHER.name, "teacher", TrainingArtifact(TEACHER.name, "teacher"))
        config = trainer_config({**section.training, **training_flags(section.dtype)}, tmp, section.seed)
        train_sft(model, tokenizer, sft_rows(rows, template, "rationale"), config, tmp, callbacks=[progress])
        write_location(tmp, MODEL)
        out.finish(tmp, rows=len(rows), params=count_params(model), seconds=round(time.perf_counter() - start, 1))
    return out.ref()


# Not Prefect-cached: the key must cover the weights' bytes, which are not a task input; the body finds its
# own finished output by that key instead.
@task(cache_policy=NO_CACHE, task_run_name="use_existing_teacher[{section.model}]")
def use_existing_teacher(run_dir: Path, section: TeacherSection) -> OutputRef:
    """A teacher named by the recipe (a local folder or a hub id): recorded, not copied. A local folder's weights are
    read once here (per content), before any stage loads them: weights of other names or shapes than its config's, or
    NaN in them, fail this stage naming the folder instead of giving a run of garbage answers."""
    out = EXISTING_TEACHER.output(run_dir, section=section)
    if done := out.done:
        return done
    if Path(section.model).is_dir() and (problem := weights_problem(Path(section.model))):
        raise DamagedModel(f"teacher.model: {problem}")
    with out.building() as tmp:
        local = Path(section.model)
        location = str(local.resolve()) if local.is_dir() else section.model
        write_location(tmp, location)
        weights = out.inputs["weights"]  # the folder's digest its key holds (None for a hub id: its name is all)
        (tmp / WEIGHTS).write_text(json.dumps({"sha256": weights}))
        out.finish(tmp, given=location)  # the report's teacher row names it
    return out.ref()


@task(cache_policy=StageCache(API_TEACHER), **STAGE_RESULTS, task_run_name="record_api_teacher[{api.model}]")
def record_api_teacher(
    run_dir: Path, section: TeacherSection, api: ApiSection, data: OutputRef, template: str
) -> OutputRef:
    """The API model as the teacher: its identity in the manifest (``api``), and the tokenizer from-scratch students
    share in ``tokenizer/`` (where ``model_location`` points). No weights: nothing here can run the teacher."""
    out = API_TEACHER.output(run_dir, section=section, api=api, data=data, template=template)
    if done := out.done:
        return done
    rows = read_split(data, teacher_split(data))
    with out.building() as tmp:
        gold_tokenizer(rows, template, section.vocab_size).save_pretrained(tmp / "tokenizer")
        write_location(tmp, "tokenizer")
        out.finish(tmp, rows=len(rows), api=api.identity(), weights=None)
    return out.ref()


@task(cache_policy=StageCache(IMPORTED_TEACHER), **STAGE_RESULTS, task_run_name="record_imported_teacher")
def record_imported_teacher(run_dir: Path, section: TeacherSection) -> OutputRef:
    """The teacher of an imported logit dataset: recorded as absent (``imported``, no weights, no location), so that
    what follows knows not to load, score or evaluate it."""
    out = IMPORTED_TEACHER.output(run_dir, section=section)
    if done := out.done:
        return done
    with out.building() as tmp:
        out.finish(tmp, imported=True, weights=None)
    return out.ref()
