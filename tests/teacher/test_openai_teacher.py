"""Fast offline tests of the teacher client (the real ``openai`` client over an httpx mock transport), the
durable shards, the prompts and the generation recipe section. The same paths against a real vLLM server
are in test_vllm_teacher.py."""

import asyncio
import json
import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import openai
import pytest

from kdflow.config.generation import Endpoint, GenerationSection
from kdflow.store.outputs import content_key
from kdflow.teacher.answer_shards import ShardWriter, read_shards
from kdflow.teacher.api_client import (
    BACKOFF_CAP_S,
    FailureReason,
    FatalApiError,
    Sampling,
    TeacherRequest,
    ask_all,
    backoff_seconds,
    classify,
    retry_after_seconds,
)
from kdflow.teacher.prompts import demonstrations, teacher_prompt, teacher_request

SENTINEL = "sk-SENTINEL-do-not-leak-4242"
COT = "Solve step by step: {{ question }}"


def completion(text="1+2=3\nAnswer: 3", logprobs=None) -> dict:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": "stop",
        "logprobs": logprobs,
    }
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [choice],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
    }


def run(handler, requests, **kw):
    """ask_all with the real openai client whose HTTP goes to ``handler`` (an httpx.MockTransport)."""
    records = []

    async def main():
        client = openai.AsyncOpenAI(
            base_url="http://teacher.test/v1",
            api_key=SENTINEL,
            max_retries=0,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        )
        async with client:
            return await ask_all(
                client,
                requests,
                Sampling(model="m", max_tokens=8, **kw.pop("sampling", {})),
                concurrency=kw.pop("concurrency", 4),
                max_retries=kw.pop("max_retries", 3),
                on_record=records.append,
                secret=SENTINEL,
                **kw,
            )

    return asyncio.run(main()), records


def requests(n=3):
    return [TeacherRequest(id=f"r{i}", sample=0, messages=[{"role": "user", "content": f"q{i}"}]) for i in range(n)]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr("kdflow.teacher.api_client.BACKOFF_BASE_S", 0.001)


def test_transient_errors_are_retried_and_counted_then_answered():
    seen = {"n": 0}
    script = [
        httpx.Response(429, headers={"retry-after-ms": "1"}, json={"error": {"message": "slow down"}}),
        httpx.Response(503, json={"error": {"message": "busy"}}),
        "timeout",
        "drop",
    ]

    def handler(request):
        seen["n"] += 1
        step = script.pop(0) if script else None
        if step == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        if step == "drop":
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return step or httpx.Response(200, json=completion())

    acct, records = run(handler, requests(1), concurrency=1, max_retries=5)
    assert [r["ok"] for r in records] == [True] and records[0]["text"].endswith("Answer: 3")
    assert acct.retries == 4 and acct.requests == seen["n"] == 5 and acct.failures == 0
    assert acct.retries_by_reason == {"rate_limited": 1, "server_error": 1, "timeout": 1, "connection": 1}
    assert acct.prompt_tokens == 7 and acct.completion_tokens == 5


def test_a_bad_request_is_a_failure_row_not_retried_and_retries_run_out_into_a_failure_row():
    def handler(request):
        content = json.loads(request.content)["messages"][0]["content"]
        if content == "q0":
            return httpx.Response(400, json={"error": {"message": "prompt too long"}})
        if content == "q1":
            return httpx.Response(500, json={"error": {"message": "boom"}})
        return httpx.Response(200, json=completion())

    acct, records = run(handler, requests(3), max_retries=2)
    by_id = {r["id"]: r for r in records}
    assert by_id["r0"]["ok"] is False and by_id["r0"]["reason"] == FailureReason.bad_request.value
    assert by_id["r0"]["attempts"] == 1 and "prompt too long" in by_id["r0"]["error"]
    assert by_id["r1"]["reason"] == FailureReason.server_error.value and by_id["r1"]["attempts"] == 3
    assert by_id["r2"]["ok"] is True
    assert acct.failures == 2 and acct.answers == 1 and acct.retries == 2


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_missing_model_stop_the_run_at_once_without_the_key(status):
    calls = {"n": 0}

    def handler(request):
        calls["n"] += 1
        # A server that echoes the key back (OpenAI's 401 quotes part of it): it must still not leak.
        return httpx.Response(status, json={"error": {"message": f"Incorrect API key provided: {SENTINEL}"}})

    with pytest.raises(FatalApiError) as e:
        run(handler, requests(50), concurrency=4)
    assert str(status) in str(e.value) and SENTINEL not in str(e.value) and "[redacted]" in str(e.value)
    assert e.value.__cause__ is None and e.value.__context__ is None or SENTINEL not in repr(e.value.__context__)
    assert calls["n"] <= 4  # no retries; at most the requests already in flight


def test_logprobs_with_token_ids_are_kept_per_token():
    top = lambda ids: [{"token": f"token_id:{i}", "logprob": -0.1 * i, "bytes": None} for i in ids]
    content = [
        {"token": "token_id:5", "logprob": -0.5, "bytes": None, "top_logprobs": top([5, 6, 7])},
        {"token": "token_id:2", "logprob": -0.2, "bytes": None, "top_logprobs": top([2, 9, 4])},
    ]
    sent = {}

    def handler(request):
        sent.update(json.loads(request.content))
        return httpx.Response(200, json=completion(logprobs={"content": content}))

    _, records = run(handler, requests(1), sampling={"logprobs": 3, "token_ids": True, "seed": 11})
    lp = records[0]["logprobs"]
    assert lp["token_ids"] == [5, 2] and lp["top_ids"] == [[5, 6, 7], [2, 9, 4]]
    assert lp["token_logprobs"] == [-0.5, -0.2] and len(lp["top_logprobs"][0]) == 3
    assert sent["logprobs"] is True and sent["top_logprobs"] == 3 and sent["return_tokens_as_token_ids"] is True
    assert sent["seed"] == 11 and sent["n"] == 1


def test_retry_after_and_backoff():
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert retry_after_seconds(httpx.Headers({"retry-after": "3"})) == 3.0
    # An HTTP date an hour ahead: parsed into the seconds left, counted from a fixed clock (no race with the real one).
    now = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
    date = format_datetime(now + timedelta(hours=1), usegmt=True)
    assert retry_after_seconds(httpx.Headers({"retry-after": date}), now.timestamp()) == 3600
    assert retry_after_seconds(httpx.Headers({})) is None
    rng = random.Random(0)
    assert backoff_seconds(0, 2.5, rng) == 2.5  # the server's wish, not our jitter
    waits = [backoff_seconds(10, None, rng) for _ in range(200)]
    assert 0 <= min(waits) and max(waits) <= BACKOFF_CAP_S and len(set(waits)) > 100  # jittered, capped


def test_classify():
    req = httpx.Request("POST", "http://x")
    status = lambda code: openai.APIStatusError("e", response=httpx.Response(code, request=req), body=None)
    assert classify(status(429)) == (FailureReason.rate_limited, True)
    assert classify(status(502)) == (FailureReason.server_error, True)
    assert classify(status(400)) == (FailureReason.bad_request, False)
    assert classify(openai.APITimeoutError(request=req)) == (FailureReason.timeout, True)
    assert classify(openai.APIConnectionError(request=req)) == (FailureReason.connection, True)


def test_shards_resume_dedupe_and_survive_a_torn_last_line(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.append({"id": "a", "sample": 0, "ok": True, "text": "first"})
        w.append({"id": "b", "sample": 0, "ok": False, "reason": "timeout", "error": "e"})
        w.append({"id": "c", "sample": 1, "ok": False, "reason": "timeout", "error": "e"})
    with ShardWriter(tmp_path) as w:  # a second run: a duplicate of a, b answered now
        w.append({"id": "a", "sample": 0, "ok": True, "text": "second"})
        w.append({"id": "b", "sample": 0, "ok": True, "text": "b"})
    with open(w.path, "ab") as f:  # a kill in the middle of writing a record
        f.write(b'{"id": "d", "sample": 0, "ok": tr')
    answers, failures = read_shards(tmp_path)
    assert set(answers) == {("a", 0), ("b", 0)} and answers[("a", 0)]["text"] == "first"
    assert set(failures) == {("c", 1)}


def test_a_question_is_never_rendered_as_a_template():
    row = {"id": "p1", "question": "what is {{ 7*7 }} {% raw %}?"}
    assert teacher_prompt(COT, row) == "Solve step by step: what is {{ 7*7 }} {% raw %}?"
    pool = [{"id": f"t{i}", "question": f"{{{{ {i} }}}}", "rationale": f"r{i} {{{{ x }}}}"} for i in range(5)]
    icl = open("prompts/few_shot.jinja").read()
    prompt = teacher_prompt(COT, row, icl, pool[:2])
    assert "{{ 0 }}" in prompt and "r1 {{ x }}" in prompt and prompt.endswith("what is {{ 7*7 }} {% raw %}?")
    req = teacher_request(row, 0, prompt, "Be brief.", Endpoint.chat)
    assert req.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]


def test_demonstrations_are_stable_and_never_the_row_itself():
    pool = [{"id": f"t{i}", "question": str(i), "rationale": str(i)} for i in range(6)]
    for row_id in ["t0", "t3", "x"]:
        demos = demonstrations(row_id, pool, 3, seed=0)
        assert len(demos) == 3 and row_id not in [d["id"] for d in demos]
        assert demos == demonstrations(row_id, pool, 3, seed=0)


def section(**kw) -> GenerationSection:
    return GenerationSection(**{"splits": ["train"], **kw})


def test_generation_section_validates_and_keys_on_content_only():
    with pytest.raises(ValueError, match="temperature > 0"):
        section(n=4)
    with pytest.raises(ValueError, match="api.base_url"):
        section(backend="openai")
    with pytest.raises(ValueError, match="backend 'hf' does not support"):
        section(logprobs=5)
    with pytest.raises(ValueError, match="at most 20"):
        section(backend="openai", api={"base_url": "https://api.openai.com/v1"}, logprobs=50)
    key = lambda s: content_key("generate", "2", {"section": s})
    base = section(backend="openai", api={"base_url": "http://x/v1"})
    same = section(
        backend="openai",
        api={
            "base_url": "http://x/v1",
            "concurrency": 3,
            "timeout_s": 5,
            "api_key_env": "OTHER",
            "max_failure_fraction": 0.5,
        },
    )
    assert key(base) == key(same)
    assert key(base) != key(section(backend="openai", api={"base_url": "http://x/v1"}, temperature=0.5))
    assert key(section(template="prompts/instruct.jinja")) != key(section())
    assert "template_text" in base.model_dump()


def test_too_many_failures_fail_the_stage_with_counts_and_where_the_answers_are(tmp_path):
    from kdflow.teacher.generation import TooManyFailures, check_failures, failure_table

    s = section(backend="openai", api={"base_url": "http://x/v1", "max_failure_fraction": 0.1})
    rows = [
        {
            "id": f"r{i}",
            "split": "train",
            "question": "q",
            "answer": "1",
            "sample": 0,
            "prompt": "p",
            "teacher_prompt": "p",
        }
        for i in range(10)
    ]
    failed = [
        {
            "id": "r1",
            "sample": 0,
            "ok": False,
            "reason": "timeout",
            "status": None,
            "error": "APITimeoutError",
            "attempts": 7,
        }
    ]
    check_failures(failed, 10, s, tmp_path)  # 10 %: allowed
    with pytest.raises(TooManyFailures, match=r"2 of 10 teacher requests failed for good \(20.0% > .*10.0%\).*timeout"):
        check_failures(failed * 2, 10, s, tmp_path)
    table = failure_table(rows, failed)
    assert table.to_dict("records")[0] | {} == {
        "id": "r1",
        "split": "train",
        "question": "q",
        "answer": "1",
        "sample": 0,
        "prompt": "p",
        "reason": "timeout",
        "status": None,
        "error": "APITimeoutError",
        "attempts": 7,
        "raw": None,
    }
    assert list(failure_table(rows, []).columns)[-5:] == ["reason", "status", "error", "attempts", "raw"]


def test_stage_request_path_offline_faults_retried_and_a_rerun_asks_nothing(tmp_path):
    """api_answers (the generate stage's durable path, no Prefect) against a fake teacher behind the fault proxy."""
    from kdflow.teacher.generation import api_answers
    from tests.fault_proxy import FakeTeacher, FaultProxy

    rows = [
        {
            "id": f"r{i}",
            "split": "prompts",
            "question": f"{i} {{{{ 7*7 }}}}",
            "answer": "1",
            "sample": s,
            "prompt": f"q{i}",
            "teacher_prompt": f"q{i} {{{{ 7*7 }}}} #{s}",
        }
        for i in range(30)
        for s in range(2)
    ]
    with FakeTeacher() as fake, FaultProxy(fake.url, rate=0.2, faults=("429", "500", "drop"), seed=3) as proxy:
        s = section(
            backend="openai",
            n=2,
            temperature=0.5,
            api={"base_url": proxy.url + "/v1", "model": "m", "api_key_env": None, "max_retries": 20},
        )
        answers, failures, acct = api_answers(s, "m", rows, tmp_path / "shards")
        assert len(answers) == 60 and not failures and acct.answers == 60
        assert acct.retries == sum(proxy.faults.values()) > 0
        assert {(a["id"], a["sample"]) for a in answers} == {(r["id"], r["sample"]) for r in rows}
        assert all(
            a["text"] == f"echo: {r['teacher_prompt']}"
            for a, r in zip(
                sorted(answers, key=lambda a: (a["id"], a["sample"])),
                sorted(rows, key=lambda r: (r["id"], r["sample"])),
            )
        )
        sent = sum(proxy.bodies.values())
        again = api_answers(s, "m", rows, tmp_path / "shards")
        assert sum(proxy.bodies.values()) == sent and again[2].resumed == 60 and len(again[0]) == 60


@pytest.mark.slow
def test_hf_backend_stage_keeps_its_columns_and_adds_samples(prefect_server, tmp_path):
    """The CPU backend through the stage body: n samples per question, the answers' columns, the ICL prompt."""
    import pandas as pd

    from kdflow.config.teacher import TeacherSection
    from kdflow.store.outputs import building, existing_output, finish
    from tasks.generate import generate_answers
    from tasks.teacher import use_existing_teacher
    from tests.conftest import build_tiny_teacher

    run_dir = tmp_path / "run"
    rows = {
        "train": [
            {"id": f"t{i}", "question": f"{i}+1", "rationale": f"{i}+1={i + 1}", "answer": str(i + 1)} for i in range(4)
        ],
        "prompts": [{"id": f"p{i}", "question": f"{i}+2 {{{{ 7*7 }}}}", "answer": str(i + 2)} for i in range(3)],
    }
    with building(run_dir, "data", "k" * 64) as tmp:
        for split, table in rows.items():
            pd.DataFrame(table).to_parquet(tmp / f"{split}.parquet", index=False)
        finish(tmp, "data", "k" * 64, inputs={}, splits={k: len(v) for k, v in rows.items()})
    data = existing_output(run_dir, "data", "k" * 64)
    teacher = use_existing_teacher.fn(run_dir, TeacherSection(model=str(build_tiny_teacher(tmp_path / "teacher"))))
    s = section(splits=["prompts"], n=2, temperature=1.0, seed=0, max_new_tokens=4, icl={"k": 2, "pool_split": "train"})
    ref = generate_answers.fn(run_dir, s, COT, teacher, data)
    answers = pd.read_parquet(f"{ref.path}/answers.parquet")
    assert len(answers) == 6 and sorted(answers["sample"].tolist()) == [0, 0, 0, 1, 1, 1]
    assert {
        "id",
        "split",
        "question",
        "answer",
        "text",
        "finish_reason",
        "completion_tokens",
        "sample",
        "prompt",
        "demo_ids",
    } <= set(answers.columns)
    assert answers["prompt"].tolist()[0] == "Solve step by step: 0+2 {{ 7*7 }}"
    assert ref.manifest()["accounting"]["answers"] == 6 and ref.manifest()["failed"] == 0
