"""The self-instruct stages around the teacher's two generation passes: the expansion prompts it answers,
and the new instructions picked from its replies (parsed, deduplicated against the seeds and each other)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact

from kdflow.config.self_instruct import ANSWER_SPLIT, WRITE_SPLIT, ExpansionSection
from kdflow.curation.expansion import expansion_prompts
from kdflow.curation.expansion import pick_instructions as pick
from kdflow.curation.pipeline import DROPPED
from kdflow.store.outputs import OutputRef
from kdflow.store.stage import Stage
from kdflow.teacher.generation import ANSWERS
from tasks.caching import STAGE_RESULTS, StageCache

# ``template``: the expansion prompt's text (the flow reads it from section.template), so an edit reruns the stage.
PROMPTS = Stage(
    "self-instruct-prompts",
    "1",
    lambda section, template, seeds: {"section": section, "template": template, "seeds": seeds},
    files=(f"{WRITE_SPLIT}.parquet",),
)
INSTRUCTIONS = Stage(
    "self-instruct-instructions",
    "1",
    lambda section, seeds, written: {"section": section, "seeds": seeds, "written": written},
    files=(f"{ANSWER_SPLIT}.parquet", DROPPED),
)


@task(
    cache_policy=StageCache(PROMPTS), **STAGE_RESULTS, task_run_name="make_expansion_prompts[{section.prompts} prompts]"
)
def make_expansion_prompts(run_dir: Path, section: ExpansionSection, template: str, seeds: list[str]) -> OutputRef:
    out = PROMPTS.output(run_dir, section=section, template=template, seeds=seeds)
    if done := out.done:
        return done
    rows = expansion_prompts(
        seeds, template, section.prompts, section.seeds_per_prompt, section.new_per_prompt, section.seed
    )
    with out.building() as tmp:
        pd.DataFrame(rows).to_parquet(tmp / f"{WRITE_SPLIT}.parquet", index=False)
        out.finish(tmp, rows=len(rows), seeds=len(seeds))
    return out.ref()


@task(
    cache_policy=StageCache(INSTRUCTIONS),
    **STAGE_RESULTS,
    task_run_name=lambda parameters: f"pick_instructions[against {len(parameters['seeds'])} seeds]",
)
def pick_instructions(run_dir: Path, section: ExpansionSection, seeds: list[str], written: OutputRef) -> OutputRef:
    """``written``: the generate stage's output for the expansion prompts. Writes ``instructions.parquet``
    (a split the generate stage can answer) and ``dropped.parquet`` (every candidate or reply not kept)."""
    out = INSTRUCTIONS.output(run_dir, section=section, seeds=seeds, written=written)
    if done := out.done:
        return done
    replies = pd.read_parquet(Path(written.path) / ANSWERS).to_dict("records")
    picked = pick(replies, seeds, section)
    instructions, dropped, counts = picked["instructions"], picked["dropped"], picked["counts"]
    with out.building() as tmp:
        pd.DataFrame(instructions, columns=["id", "question", "answer", "source"]).to_parquet(
            tmp / f"{ANSWER_SPLIT}.parquet", index=False
        )
        pd.DataFrame(dropped, columns=["source", "instruction", "text", "reasons", "detail"]).to_parquet(
            tmp / DROPPED, index=False
        )
        out.finish(
            tmp,
            rows=len(instructions),
            replies=len(replies),
            candidates=picked["candidates"],
            kept=len(instructions),
            dropped=len(dropped),
            drop_reasons=counts,
        )
    create_table_artifact(
        key="self-instruct-drops",
        table=[{"reason": r, "rows": n} for r, n in sorted(counts.items())]
        + [{"reason": "(kept)", "rows": len(instructions)}],
        description=f"New instructions from {len(replies)} teacher replies: kept, and dropped by reason",
    )
    return out.ref()
