"""Stage 0: the task data (the demo generator, or GSM8K from local files), one parquet file per split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task

from data import arithmetic, gsm8k
from kdflow.store.data_files import check_utf8
from kdflow.store.outputs import OutputRef, building, existing_output, finish
from kdflow.config.recipe import ROOT, DataSection, DataSource
from tasks.caching import STAGE_RESULTS, StageCache, stage_key

STAGE, VERSION = "data", "1"


def build_splits(section: DataSection) -> dict[str, list[dict]]:
    if section.source is DataSource.arithmetic:
        d = section.difficulty
        difficulty = arithmetic.Difficulty(d.min_steps, d.max_steps, d.max_operand)
        splits = arithmetic.generate_splits(section.splits, section.seed, difficulty)
        return {name: [{**r, "answer": str(r["answer"])} for r in rows] for name, rows in splits.items()}
    folder = Path(section.path) if Path(section.path).is_absolute() else ROOT / section.path
    out = {}
    for name, n in section.splits.items():
        file = folder / f"{name}.jsonl"
        if not file.is_file():
            raise FileNotFoundError(f"data.splits names {name!r} but {file} does not exist: add the file or remove the split")
        out[name] = gsm8k.load_split(file, n)
    return out


@task(cache_policy=StageCache(STAGE, VERSION), **STAGE_RESULTS)
def make_data(run_dir: Path, section: DataSection) -> OutputRef:
    key = stage_key(STAGE, VERSION, {"section": section})
    if done := existing_output(run_dir, STAGE, key):
        return done
    splits = build_splits(section)
    for name, rows in splits.items():
        check_utf8(rows, f"data split {name!r}")
    with building(run_dir, STAGE, key) as tmp:
        for name, rows in splits.items():
            pd.DataFrame(rows).to_parquet(tmp / f"{name}.parquet", index=False)
        counts = {name: len(rows) for name, rows in splits.items()}
        finish(tmp, STAGE, key, inputs={"section": section}, rows=sum(counts.values()), splits=counts)
    return existing_output(run_dir, STAGE, key)
