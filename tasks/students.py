"""Stage 4: students, trained with TRL's SFTTrainer: the baseline on gold rationales, seq-KD on the
teacher's kept answers (which also cover questions the gold set does not)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from prefect import task
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdflow.models import model_location, write_location
from kdflow.outputs import OutputRef, building, existing_output, finish
from kdflow.recipe import StudentData, StudentSection
from kdflow.sft import train_sft
from kdflow.tiny_models import count_params, llama_model
from tasks.caching import StageCache, stage_key
from tasks.data import read_split
from tasks.teacher import sft_rows

STAGE, VERSION = "students", "1"


def student_rows(section: StudentSection, template: str, data: OutputRef, curated: OutputRef | None) -> list[dict]:
    if section.data is StudentData.gold:
        return sft_rows(read_split(data, "train"), template, "rationale")
    if curated is None:
        raise ValueError(f"student {section.name!r} learns from the teacher's answers; pass the curate stage's output")
    kept = pd.read_parquet(Path(curated.path) / "kept.parquet").to_dict("records")
    return sft_rows(kept, template, "text")


def init_student(section: StudentSection, teacher: OutputRef):
    """A pretrained student with its own tokenizer, or a fresh Llama sharing the teacher's tokenizer."""
    if section.model:
        return AutoModelForCausalLM.from_pretrained(section.model), AutoTokenizer.from_pretrained(section.model)
    tokenizer = AutoTokenizer.from_pretrained(model_location(teacher))
    a = section.architecture
    return llama_model(tokenizer, a.hidden, a.layers, a.heads, a.intermediate, seed=section.seed), tokenizer


@task(cache_policy=StageCache(STAGE, VERSION), persist_result=True)
def train_student(run_dir: Path, section: StudentSection, template: str, teacher: OutputRef, data: OutputRef,
                  curated: OutputRef | None) -> OutputRef:
    """``curated`` is None for a gold-only student, so that a new filter does not retrain the baseline."""
    inputs = {"section": section, "template": template, "teacher": teacher, "data": data, "curated": curated}
    key = stage_key(STAGE, VERSION, inputs)
    if done := existing_output(run_dir, STAGE, key):
        return done
    rows = student_rows(section, template, data, curated)
    if not rows:
        raise ValueError(f"student {section.name!r} has no training rows: the filter kept no teacher answers")
    model, tokenizer = init_student(section, teacher)
    with building(run_dir, STAGE, key) as tmp:
        start = time.perf_counter()
        train_sft(model, tokenizer, rows, section.training, tmp, section.seed)
        write_location(tmp, "model")
        finish(tmp, STAGE, key, inputs=inputs, rows=len(rows), name=section.name, params=count_params(model),
               seconds=round(time.perf_counter() - start, 1))
    return existing_output(run_dir, STAGE, key)
