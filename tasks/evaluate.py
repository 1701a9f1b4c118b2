"""Stage 5: evaluate one model (teacher or student) on the evaluation split."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from prefect import task

from kdflow.evaluate import accuracy
from kdflow.generate_hf import load
from kdflow.models import model_location
from kdflow.outputs import OutputRef, building, existing_output, finish
from kdflow.recipe import DataSource, EvaluationSection
from kdflow.tiny_models import count_params
from tasks.caching import StageCache, stage_key
from tasks.curate import answer_checker
from tasks.data import read_split

STAGE, VERSION = "evaluate", "1"


@task(cache_policy=StageCache(STAGE, VERSION), persist_result=True)
def evaluate_model(run_dir: Path, section: EvaluationSection, template: str, source: DataSource,
                   model: OutputRef, data: OutputRef) -> OutputRef:
    inputs = {"section": section, "template": template, "source": source.value, "model": model, "data": data}
    key = stage_key(STAGE, VERSION, inputs)
    if done := existing_output(run_dir, STAGE, key):
        return done
    rows = read_split(data, section.split)
    net, tokenizer = load(model_location(model))
    start = time.perf_counter()
    acc, predictions = accuracy(net, tokenizer, rows, template, answer_checker(source)[0],
                                section.max_new_tokens, section.batch_size)
    metrics = {"accuracy": acc, "params": count_params(net), "rows": len(rows), "split": section.split,
               "seconds": round(time.perf_counter() - start, 1)}
    with building(run_dir, STAGE, key) as tmp:
        pd.DataFrame(predictions).to_parquet(tmp / "predictions.parquet", index=False)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        finish(tmp, STAGE, key, inputs=inputs, rows=len(rows), metrics=metrics)
    return existing_output(run_dir, STAGE, key)
