"""Stage 0: the task data (the demo generator, GSM8K or instruction files), one parquet file per split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task

from data import arithmetic, gsm8k, instructions
from kdflow.config.data import DataSection, DataSource, SolutionOrder
from kdflow.config.fields import PATH_RULE
from kdflow.store.data_files import DataError, check_utf8
from kdflow.store.outputs import OutputRef, file_sha256
from kdflow.store.stage import Stage
from tasks.caching import STAGE_RESULTS, StageCache


def data_content(section: DataSection) -> dict:
    """What the splits are made from: the section, and for data files their content, so that an edited file makes
    new splits (a key of the path alone reused the old gold answers after an edit). The generated source has none."""
    if section.source is DataSource.instructions:
        files = {field: section.location(field) for field in ("transfer", "test")}
    elif section.source is DataSource.gsm8k:
        files = {name: section.location("path") / f"{name}.jsonl" for name in section.splits}
    else:
        return {"section": section}
    # A split file that is missing or not a regular file is left to build_splits, which names it and the fix.
    return {"section": section, "files": {k: file_sha256(p) if p.is_file() else None for k, p in files.items()}}


DATA = Stage("data", "1", data_content)


def build_splits(section: DataSection) -> dict[str, list[dict]]:
    if section.source is DataSource.arithmetic:
        d = section.difficulty
        difficulty = arithmetic.Difficulty(d.min_steps, d.max_steps, d.max_operand)
        splits = arithmetic.generate_splits(
            section.splits, section.seed, difficulty, commuted=section.solution_order is SolutionOrder.commuted
        )
        return {name: [{**r, "answer": str(r["answer"])} for r in rows] for name, rows in splits.items()}
    if section.source is DataSource.instructions:
        return instructions.load_splits(
            section.location("transfer"), section.location("test"), section.splits, section.seed
        )
    folder = section.location("path")
    out = {}
    for name, n in section.splits.items():
        file = folder / f"{name}.jsonl"
        if file.exists() and not file.is_file():  # a folder, a FIFO (reading would wait forever), a device
            raise DataError(
                f"data.splits names {name!r} but {file} is not a regular file: put the split's rows in a "
                "JSONL file there"
            )
        if not file.is_file():
            raise FileNotFoundError(
                f"data.splits names {name!r} but {file} does not exist: add the file or remove the "
                f"split (data.path {section.path!r}: {PATH_RULE})"
            )
        out[name] = gsm8k.load_split(file, n)
    return out


@task(cache_policy=StageCache(DATA), **STAGE_RESULTS, task_run_name="make_data[{section.source.value}]")
def make_data(run_dir: Path, section: DataSection) -> OutputRef:
    out = DATA.output(run_dir, section=section)
    if done := out.done:
        return done
    splits = build_splits(section)
    for name, rows in splits.items():
        check_utf8(rows, f"data split {name!r}")
    with out.building() as tmp:
        for name, rows in splits.items():
            pd.DataFrame(rows).to_parquet(tmp / f"{name}.parquet", index=False)
        counts = {name: len(rows) for name, rows in splits.items()}
        out.finish(tmp, rows=sum(counts.values()), splits=counts)
    return out.ref()
