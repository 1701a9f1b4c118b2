"""Stage 2: the teacher answers questions with chain-of-thought (HF transformers backend, batched)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from prefect import task

from kdflow.generate_hf import generate, load
from kdflow.models import model_location
from kdflow.outputs import OutputRef, building, existing_output, finish
from kdflow.prompts import render
from kdflow.recipe import Backend, GenerationSection
from tasks.caching import StageCache, stage_key
from tasks.data import read_split

STAGE, VERSION = "generate", "1"


@task(cache_policy=StageCache(STAGE, VERSION), persist_result=True, retries=2, retry_delay_seconds=10)
def generate_answers(run_dir: Path, section: GenerationSection, template: str, teacher: OutputRef,
                     data: OutputRef) -> OutputRef:
    inputs = {"section": section, "template": template, "teacher": teacher, "data": data}
    key = stage_key(STAGE, VERSION, inputs)
    if done := existing_output(run_dir, STAGE, key):
        return done
    if section.backend is not Backend.hf:
        raise NotImplementedError(f"generation.backend {section.backend.value!r} arrives with the teacher-querying "
                                  "issue; use 'hf' for now")
    rows = [{**r, "split": split} for split in section.splits for r in read_split(data, split)]
    model, tokenizer = load(model_location(teacher))
    start = time.perf_counter()
    outputs = generate(model, tokenizer, [render(template, question=r["question"]) for r in rows],
                       section.max_new_tokens, section.batch_size, section.temperature)
    seconds = time.perf_counter() - start
    answers = [{"id": r["id"], "split": r["split"], "question": r["question"], "answer": r["answer"], **o}
               for r, o in zip(rows, outputs)]
    with building(run_dir, STAGE, key) as tmp:
        pd.DataFrame(answers).to_parquet(tmp / "answers.parquet", index=False)
        tokens = sum(o["completion_tokens"] for o in outputs)
        finish(tmp, STAGE, key, inputs=inputs, rows=len(answers), completion_tokens=tokens,
               seconds=round(seconds, 1), tokens_per_second=round(tokens / seconds, 1))
    return existing_output(run_dir, STAGE, key)
