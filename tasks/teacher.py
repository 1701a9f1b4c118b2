"""Stage 1: the teacher. Trained from scratch on the gold rationales (the source's first step: "first
train the big teacher, then distil the student from it"), or an existing model named by the recipe.
The shared tokenizer is trained here and saved with the teacher, so students inherit it."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from kdflow.store.model_folders import write_location
from kdflow.store.run_folder import read_split
from kdflow.store.outputs import OutputRef, building, existing_output, finish, hash_folder
from kdflow.config.templates import sft_rows
from kdflow.config.recipe import TeacherSection
from kdflow.training.sft import train_sft
from kdflow.training.tiny_models import count_params, llama_model, train_tokenizer
from tasks.caching import STAGE_RESULTS, StageCache, stage_key

STAGE, VERSION = "teacher", "1"
TOKENIZER_CORPUS_ROWS = 5000  # plenty to learn every merge of this small language


def teacher_split(data: OutputRef) -> str:
    """The teacher learns from its own split when the data has one, else from the students' gold set."""
    return "teacher" if "teacher" in data.manifest()["splits"] else "train"


# No retries: a failed training run is a bug or a bad recipe, not a blip; it is not retried blindly.
@task(cache_policy=StageCache(STAGE, VERSION), **STAGE_RESULTS)
def train_teacher_model(run_dir: Path, section: TeacherSection, data: OutputRef, template: str) -> OutputRef:
    inputs = {"section": section, "data": data, "template": template}
    key = stage_key(STAGE, VERSION, inputs)
    if done := existing_output(run_dir, STAGE, key):
        return done
    rows = read_split(data, teacher_split(data))
    with building(run_dir, STAGE, key) as tmp:
        start = time.perf_counter()
        corpus = [render(template, question=r["question"]) + "\n" + r["rationale"] for r in rows[:TOKENIZER_CORPUS_ROWS]]
        tokenizer = train_tokenizer(corpus, section.vocab_size)
        a = section.architecture
        model = llama_model(tokenizer, a.hidden, a.layers, a.heads, a.intermediate, seed=section.seed)
        train_sft(model, tokenizer, sft_rows(rows, template, "rationale"), section.training, tmp, section.seed)
        write_location(tmp, "model")
        finish(tmp, STAGE, key, inputs=inputs, rows=len(rows), params=count_params(model),
               seconds=round(time.perf_counter() - start, 1))
    return existing_output(run_dir, STAGE, key)


# Not Prefect-cached: the key must cover the weights' bytes, which are not a task input; the body finds its
# own finished output by that key instead.
@task(cache_policy=NO_CACHE)
def use_existing_teacher(run_dir: Path, section: TeacherSection) -> OutputRef:
    """A teacher named by the recipe (a local folder or a hub id): recorded, not copied."""
    local = Path(section.model)
    # A local folder is keyed by its bytes, so replacing the weights in place invalidates what follows.
    identity = {"section": section, "weights": hash_folder(local) if local.is_dir() else None}
    key = stage_key(STAGE, VERSION, identity)
    if done := existing_output(run_dir, STAGE, key):
        return done
    with building(run_dir, STAGE, key) as tmp:
        write_location(tmp, str(local.resolve()) if local.is_dir() else section.model)
        finish(tmp, STAGE, key, inputs=identity)
    return existing_output(run_dir, STAGE, key)
