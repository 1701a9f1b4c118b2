"""The logit-cache stage sharded across the workers of a Dask cluster (prefect-dask's DaskTaskRunner): each worker
captures one part of the kept rows — whole shards, in row order (kdflow/logit_cache/parts.py) — into the stage's work
folder; one task joins the parts into one cache (its cache.json written last); the ordinary capture task then
finds that cache whole, captures nothing, and publishes it under the same content key as the unsharded stage.

    python -m flows.capture_sharded recipes/demo.yaml --workers 2                 # a local cluster
    python -m flows.capture_sharded RECIPE --address tcp://scheduler:8786         # an existing one

The workers write into the run folder, so on several machines it must be on storage they all mount. With
`logit_cache.source: vllm` each worker starts the teacher's vLLM server on its own machine (data parallel), or
they all ask the one at `logit_cache.base_url`.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.cli import run_as_script
from flows.lookups import found_upstream, one_teacher, run_teacher
from kdflow.config.loading import RecipeError
from kdflow.config.logit_cache import LogitCacheSection
from kdflow.config.recipe import load_recipe
from kdflow.logit_cache.capture import capture_member, capture_setup
from kdflow.logit_cache.parts import join_parts, part_bounds
from kdflow.store.outputs import OutputRef
from tasks.capture import CAPTURE, capture_logits, shard_logger


def part_folder(work: Path, part: int, member: int) -> Path:
    return work / f"part-{part}" / f"teacher-{member}"


# No cache policy: a part's shards are durable in the work folder; rerun, it captures only what is missing.
@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
def capture_part(
    run_dir: Path,
    section: LogitCacheSection,
    template: str,
    teacher: OutputRef,
    curated: OutputRef,
    part: int,
    parts: int,
) -> dict:
    """Capture part ``part`` of ``parts`` for every teacher; returns who captured how much, how fast."""
    work = CAPTURE.output(run_dir, section=section, template=template, teacher=teacher, curated=curated).work
    _, kept, rows, teachers = capture_setup(section, template, teacher, curated)
    begin, end = part_bounds(len(rows), section.shard_rows, parts)[part]
    start = time.perf_counter()
    for j, (location, meta, _) in enumerate(teachers):
        capture_member(
            part_folder(work, part, j), section, location, kept[begin:end], rows[begin:end], meta, shard_logger()
        )
    return {
        "part": part,
        "rows": end - begin,
        "seconds": round(time.perf_counter() - start, 1),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


@task(cache_policy=NO_CACHE)
def join_cache(
    run_dir: Path, section: LogitCacheSection, template: str, teacher: OutputRef, curated: OutputRef, parts: int
) -> None:
    """Join each teacher's parts into the one cache the capture task looks for (``teacher-<j>``)."""
    work = CAPTURE.output(run_dir, section=section, template=template, teacher=teacher, curated=curated).work
    for j in range(1 + len(section.ensemble)):
        join_parts([part_folder(work, p, j) for p in range(parts)], work / f"teacher-{j}")


@flow(name="capture-sharded")
def capture_sharded(recipe: str, run_dir: str | None = None, parts: int = 2) -> OutputRef:
    """Run under a DaskTaskRunner (`kdflow logit-cache-sharded` makes one); ``parts``: one per worker is plenty."""
    r = load_recipe(recipe)
    one_teacher(r, "logit-cache-sharded")
    if r.logit_cache is None:
        raise RecipeError(f"{recipe}: no logit_cache section; add one (e.g. `logit_cache: {{k: 20}}`)")
    run, cot, section = Path(run_dir) if run_dir else r.run_dir, r.prompts.cot_text(), r.logit_cache
    teacher = run_teacher(run, r)
    curated = found_upstream(run, r, teacher, curated=True, logits=False).curated  # the recipe's, not the newest
    if not CAPTURE.output(run, section=section, template=cot, teacher=teacher, curated=curated).done:
        futures = [capture_part.submit(run, section, cot, teacher, curated, p, parts) for p in range(parts)]
        done = [f.result() for f in futures]
        join_cache(run, section, cot, teacher, curated, parts)
        create_table_artifact(key="logit-cache-parts", table=done, description="rows captured per part and worker")
    return capture_logits(run, section, cot, teacher, curated)


if __name__ == "__main__":
    run_as_script("logit-cache-sharded")  # the same arguments and --help as `kdflow logit-cache-sharded`
