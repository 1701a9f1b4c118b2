"""Stage 3: keep the teacher's answers whose final answer matches the gold one; drops keep their reasons."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact

from data import arithmetic, gsm8k
from kdflow.curate import filter_by_correctness, reason_counts
from kdflow.outputs import OutputRef, building, existing_output, finish
from kdflow.recipe import DataSource, FiltersSection
from tasks.caching import StageCache, stage_key

STAGE, VERSION = "curate", "1"


def answer_checker(source: DataSource):
    """(check(text, gold) -> bool, extract(text) -> answer | None) for the data source's answer format."""
    if source is DataSource.arithmetic:
        return arithmetic.check_answer, arithmetic.extract_answer
    return gsm8k.check_answer, gsm8k.final_answer


@task(cache_policy=StageCache(STAGE, VERSION), persist_result=True)
def filter_answers(run_dir: Path, section: FiltersSection, source: DataSource, answers: OutputRef) -> OutputRef:
    inputs = {"section": section, "source": source.value, "answers": answers}
    key = stage_key(STAGE, VERSION, inputs)
    if done := existing_output(run_dir, STAGE, key):
        return done
    rows = pd.read_parquet(Path(answers.path) / "answers.parquet").to_dict("records")
    if section.correctness:
        kept, dropped = filter_by_correctness(rows, *answer_checker(source))
    else:
        kept, dropped = rows, []
    counts = reason_counts(dropped)
    with building(run_dir, STAGE, key) as tmp:
        pd.DataFrame(kept, columns=list(rows[0])).to_parquet(tmp / "kept.parquet", index=False)
        pd.DataFrame(dropped, columns=[*rows[0], "reasons"]).to_parquet(tmp / "dropped.parquet", index=False)
        finish(tmp, STAGE, key, inputs=inputs, rows=len(kept), input_rows=len(rows), kept=len(kept),
               dropped=len(dropped), drop_reasons=counts)
    create_table_artifact(
        key="curate-drops",
        table=[{"reason": r, "rows": n} for r, n in sorted(counts.items())] + [{"reason": "(kept)", "rows": len(kept)}],
        description=f"Teacher answers kept and dropped by reason, out of {len(rows)}",
    )
    return existing_output(run_dir, STAGE, key)
