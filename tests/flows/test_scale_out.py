"""Teacher generation and logit capture sharded over a local Dask cluster of 2 worker processes (prefect-dask's
DaskTaskRunner). Generation, against a fake OpenAI-compatible teacher: every (row, sample) asked exactly once, by
both workers together, and the stage's output the same as the unsharded stage's (same content key, one answer per
row). Capture, with a tiny HF teacher: one cache, every row exactly once, the same as one process's capture."""

import asyncio
import json
import re

import pandas as pd
import pytest
import torch

from kdflow.config.recipe import load_recipe
from kdflow.store import run_folder

pytestmark = pytest.mark.slow


def openai_recipe(mini_recipe, teacher_dir, base_url: str):
    text = mini_recipe.read_text()
    text = re.sub(r"teacher:\n(  .*\n)+", f"teacher:\n  model: {teacher_dir}\n", text)
    text = re.sub(
        r"generation:\n(  .*\n)+",
        "generation:\n  backend: openai\n  splits: [train, prompts]\n"
        f"  max_new_tokens: 24\n  api: {{base_url: '{base_url}', model: m, api_key_env: null, concurrency: 4}}\n",
        text,
    )
    mini_recipe.write_text(text)
    return mini_recipe


def test_generation_sharded_on_two_dask_workers_asks_each_request_once(prefect_server, mini_recipe, tmp_path):
    from prefect_dask import DaskTaskRunner

    from flows.generate_sharded import generate_sharded
    from flows.train_teacher import train_teacher
    from tasks.data import make_data
    from tests.conftest import build_tiny_teacher
    from tests.fault_proxy import FakeTeacher, FaultProxy

    teacher_dir = build_tiny_teacher(tmp_path / "teacher")
    with FakeTeacher(delay_s=0.01) as fake, FaultProxy(fake.url) as proxy:
        recipe = openai_recipe(mini_recipe, teacher_dir, proxy.url + "/v1")
        r = load_recipe(recipe)
        make_data.fn(r.run_dir, r.data)
        train_teacher(str(recipe))  # the existing teacher, recorded in the run folder
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
        state = generate_sharded.with_options(task_runner=runner)(str(recipe), None, 2, return_state=True)
        ref = state.result()
        sent = sum(proxy.bodies.values())
    answers = pd.read_parquet(f"{ref.path}/answers.parquet")
    assert len(answers) == 80 and not answers.duplicated(["id", "sample"]).any()
    assert sent == 80, "each (row, sample) asked exactly once across both workers"
    acct = ref.manifest()["accounting"]
    assert acct["requests"] == 0 and acct["resumed"] == 80  # the stage itself asked nothing: the shards did
    assert run_folder.latest(load_recipe(recipe).run_dir, "generate") == ref

    shards = asyncio.run(run_table(state, "teacher-shards"))
    assert sorted(s["shard"] for s in shards) == [0, 1] and len({s["pid"] for s in shards}) == 2  # two workers
    assert sum(s["answers"] for s in shards) == 80


async def run_table(state, key: str) -> list[dict]:
    """The table artifact ``key`` of the flow run behind ``state``: selected by flow-run id, not by which is newest
    (an order that other runs of the session, or a fast machine's equal timestamps, can change)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    assert len(artifacts) == 1, f"{len(artifacts)} {key!r} artifacts in flow run {state.state_details.flow_run_id}"
    table = json.loads(artifacts[0].data)
    return table if isinstance(table, list) else [dict(zip(table["columns"], row)) for row in table["data"]]


def test_logit_capture_sharded_on_two_dask_workers_is_one_cache_with_every_row_once(
    prefect_server, mini_recipe, tmp_path
):
    from prefect_dask import DaskTaskRunner

    from flows.capture_sharded import capture_sharded
    from kdflow.logit_cache.reader import LogitCache
    from kdflow.store.model_folders import write_location
    from tasks.capture import capture_logits
    from tasks.curate import CURATE
    from tasks.data import make_data
    from tasks.generate import GENERATE
    from tasks.teacher import TEACHER
    from tests.logit_cache.test_capture import kept_rows, stage_ref, tiny_teacher

    mini_recipe.write_text(mini_recipe.read_text() + "\nlogit_cache: {k: 5, shard_rows: 4, value_encoding: fp16}\n")
    r = load_recipe(mini_recipe)
    tiny_teacher(tmp_path / "teacher-model", sharpen=20.0)
    # The stage flow finds the teacher and its curated rows under the keys the recipe gives them (flows/chain.py).
    data, cot = make_data.fn(r.run_dir, r.data), r.prompts.cot_text()
    teacher = stage_ref(
        r.run_dir,
        "teacher",
        lambda d: write_location(d, str(tmp_path / "teacher-model")),
        TEACHER.key(section=r.teacher, data=data, template=cot),
    )
    answers = stage_ref(
        r.run_dir,
        "generate",
        lambda d: None,
        GENERATE.key(section=r.generation, template=cot, teacher=teacher, data=data),
    )
    curated = stage_ref(
        r.run_dir,
        "curate",
        lambda d: pd.DataFrame(kept_rows(23)).to_parquet(d / "kept.parquet"),
        CURATE.key(section=r.filters, source=r.data.source, answers=answers, teacher=teacher),
    )

    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
    state = capture_sharded.with_options(task_runner=runner)(str(mini_recipe), None, 2, return_state=True)
    ref = state.result()
    cache = LogitCache.open(ref.path)
    cache.verify()
    assert len(cache.row_ids) == len(set(cache.row_ids)) == ref.rows == 23
    assert len(cache.manifest["shards"]) == 6 and not list((r.run_dir / "logit-cache").glob(".work-*"))
    assert run_folder.latest(r.run_dir, "logit-cache") == ref

    parts = asyncio.run(run_table(state, "logit-cache-parts"))
    assert sorted(p["part"] for p in parts) == [0, 1] and len({p["pid"] for p in parts}) == 2  # two workers
    assert sorted(p["rows"] for p in parts) == [11, 12]  # 6 shards of 4 (the last 3): 3 shards each

    # One process capturing every row (the unsharded stage, elsewhere) makes the same cache under the same key.
    single = capture_logits.fn(tmp_path / "single", r.logit_cache, r.prompts.cot_text(), teacher, curated)
    assert single.key == ref.key
    alone = LogitCache.open(single.path)
    assert alone.row_ids == cache.row_ids
    for a, b in zip(alone.iter_rows(), cache.iter_rows()):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.ids, b.ids)
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-3) and torch.allclose(a.tail, b.tail, atol=1e-3)
