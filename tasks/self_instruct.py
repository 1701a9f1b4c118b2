"""The self-instruct stages around the teacher's two generation passes: the expansion prompts it answers,
and the new instructions picked from its replies (parsed, deduplicated against the seeds and each other)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact

from kdflow.store.data_files import load_rows
from kdflow.store.outputs import OutputRef, building, existing_output, finish
from kdflow.curation.expansion import candidates, dedup_instructions, expansion_prompts
from kdflow.config.self_instruct import ANSWER_SPLIT, WRITE_SPLIT, ExpansionSection, SeedsSection
from tasks.caching import STAGE_RESULTS, StageCache, stage_key

PROMPTS_STAGE, INSTRUCTIONS_STAGE, VERSION = "self-instruct-prompts", "self-instruct-instructions", "1"


def read_seeds(section: SeedsSection) -> list[str]:
    """The seed instructions (a malformed file fails naming its line)."""
    rows = load_rows(section.location(), required=(section.field,), prompt_field=section.field)
    return [r[section.field].strip() for r in rows]


@task(cache_policy=StageCache(PROMPTS_STAGE, VERSION), **STAGE_RESULTS)
def make_expansion_prompts(run_dir: Path, section: ExpansionSection, template: str, seeds: list[str]) -> OutputRef:
    inputs = {"section": section, "template": template, "seeds": seeds}
    key = stage_key(PROMPTS_STAGE, VERSION, inputs)
    if done := existing_output(run_dir, PROMPTS_STAGE, key):
        return done
    rows = expansion_prompts(seeds, template, section.prompts, section.seeds_per_prompt, section.new_per_prompt, section.seed)
    with building(run_dir, PROMPTS_STAGE, key) as tmp:
        pd.DataFrame(rows).to_parquet(tmp / f"{WRITE_SPLIT}.parquet", index=False)
        finish(tmp, PROMPTS_STAGE, key, inputs=inputs, rows=len(rows), seeds=len(seeds))
    return existing_output(run_dir, PROMPTS_STAGE, key)


@task(cache_policy=StageCache(INSTRUCTIONS_STAGE, VERSION), **STAGE_RESULTS)
def pick_instructions(run_dir: Path, section: ExpansionSection, seeds: list[str], written: OutputRef) -> OutputRef:
    """``written``: the generate stage's output for the expansion prompts. Writes ``instructions.parquet``
    (a split the generate stage can answer) and ``dropped.parquet`` (every candidate or reply not kept)."""
    inputs = {"section": section, "seeds": seeds, "written": written}
    key = stage_key(INSTRUCTIONS_STAGE, VERSION, inputs)
    if done := existing_output(run_dir, INSTRUCTIONS_STAGE, key):
        return done
    replies = pd.read_parquet(Path(written.path) / "answers.parquet").to_dict("records")
    found, unusable = candidates(replies, section.min_words, section.max_words)
    kept, copies = dedup_instructions(found, seeds, section.threshold, section.ngram)
    dropped = unusable + copies
    counts = dict(Counter(reason for row in dropped for reason in row["reasons"]))
    instructions = [{"id": f"instruction-{i:06d}", "question": r["instruction"], "answer": "", "source": r["source"]}
                    for i, r in enumerate(kept)]
    with building(run_dir, INSTRUCTIONS_STAGE, key) as tmp:
        pd.DataFrame(instructions, columns=["id", "question", "answer", "source"]).to_parquet(
            tmp / f"{ANSWER_SPLIT}.parquet", index=False)
        pd.DataFrame(dropped, columns=["source", "instruction", "text", "reasons", "detail"]).to_parquet(
            tmp / "dropped.parquet", index=False)
        finish(tmp, INSTRUCTIONS_STAGE, key, inputs=inputs, rows=len(kept), replies=len(replies),
               candidates=len(found) + sum(r["instruction"] != "" for r in unusable), kept=len(kept),
               dropped=len(dropped), drop_reasons=counts)
    create_table_artifact(
        key="self-instruct-drops",
        table=[{"reason": r, "rows": n} for r, n in sorted(counts.items())] + [{"reason": "(kept)", "rows": len(kept)}],
        description=f"New instructions from {len(replies)} teacher replies: kept, and dropped by reason",
    )
    return existing_output(run_dir, INSTRUCTIONS_STAGE, key)
