"""The generate stage sharded across the workers of a Dask cluster (prefect-dask's DaskTaskRunner): each worker
asks the teacher for its share of the (row, sample) requests and persists every answer in the stage's
exactly-once shard folder; the ordinary generate task then finds them all there, asks for nothing more (it
would ask for whatever a lost worker left out) and writes the same output, under the same content key, as the
unsharded stage. API backends only (`openai`, `vllm`): the `hf` backend has no shard folder to share.

    python -m flows.generate_sharded recipes/gsm8k-qwen7b-to-0.5b.yaml --workers 2            # a local cluster
    python -m flows.generate_sharded RECIPE --address tcp://scheduler:8786                      # an existing one

With the `vllm` backend every worker starts the teacher's vLLM server on its own machine (data parallel;
`generation.vllm.extra_args: [--tensor-parallel-size, "4"]` splits each server over that machine's GPUs).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.chain import check_api_keys
from flows.cli import run_as_script
from flows.lookups import found, one_teacher, run_teacher
from kdflow.config.generation import Backend, GenerationSection
from kdflow.config.recipe import load_recipe
from kdflow.store.model_folders import model_location
from kdflow.store.outputs import OutputRef
from kdflow.teacher.answer_shards import adopt_folder
from kdflow.teacher.generation import api_answers, prompted_rows
from tasks.api_keys import generation_api_key
from tasks.data import DATA
from tasks.generate import GENERATE, generate_answers, shard_folder


# No cache policy: a shard's answers are durable in the shard folder; rerun, it asks only for what is missing.
@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def answer_shard(
    run_dir: Path,
    section: GenerationSection,
    template: str,
    teacher: OutputRef,
    data: OutputRef,
    shard: int,
    shards: int,
) -> dict:
    """Ask for every ``shards``-th (row, sample), starting at ``shard``; returns who answered how many."""
    out = GENERATE.output(run_dir, section=section, template=template, teacher=teacher, data=data)
    folder = shard_folder(run_dir, out.key)
    if "served" in out.inputs:  # a shard's answers asked before the served model's card was part of the key
        adopt_folder(shard_folder(run_dir, out.key_without("served")), folder)
    rows = prompted_rows(section, section.template_text or template, data)[shard::shards]
    local = section.backend is Backend.vllm
    model = model_location(teacher) if local else section.api.model or model_location(teacher)
    _, _, acct = api_answers(section, model, rows, folder, api_key=lambda: generation_api_key(section))
    return {"shard": shard, "host": socket.gethostname(), "pid": os.getpid(), **acct.as_dict()}


@flow(name="generate-sharded")
def generate_sharded(recipe: str, run_dir: str | None = None, shards: int = 2) -> OutputRef:
    """Run under a DaskTaskRunner (`kdflow generate-sharded` makes one); ``shards``: one per worker is plenty."""
    r = load_recipe(recipe)
    one_teacher(r, "generate-sharded")
    if r.generation.backend is Backend.hf:
        raise ValueError("generation.backend hf runs in one process; shard the openai or vllm backend")
    check_api_keys(r.generation)  # a missing key fails now, naming it, not as a 401 in every shard
    run, cot = Path(run_dir) if run_dir else r.run_dir, r.prompts.cot_text()
    data, teacher = found(run, DATA, section=r.data), run_teacher(run, r)  # the recipe's data, not the newest
    if not GENERATE.output(run, section=r.generation, template=cot, teacher=teacher, data=data).done:
        futures = [answer_shard.submit(run, r.generation, cot, teacher, data, i, shards) for i in range(shards)]
        done = [f.result() for f in futures]
        create_table_artifact(key="teacher-shards", table=done, description="teacher requests per shard and worker")
    return generate_answers(run, r.generation, cot, teacher, data)


if __name__ == "__main__":
    run_as_script("generate-sharded")  # the same arguments and --help as `kdflow generate-sharded`
