"""Malformed replies from an OpenAI-compatible teacher (or judge): an unreadable Retry-After, HTML from a gateway,
``choices: []``, a null message or content, a body that is not JSON. Each is retried like a transient error; one
that stays bad becomes a failure row (reason ``invalid_response``, the raw body kept) counted in the stage's
accounting, never an exception that ends the stage. The real ``openai`` client over real HTTP to the local
FakeTeacher, behind the FaultProxy that injects the replies."""

import asyncio
import re
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import openai
import pandas as pd
import pytest

from kdflow.config.generation import GenerationSection
from kdflow.teacher.api_client import FailureReason, Sampling, TeacherRequest, ask_all, classify, retry_after_seconds
from tests.fault_proxy import MALFORMED, MALFORMED_BODIES, FakeTeacher, FaultProxy

SENTINEL = "sk-SENTINEL-do-not-leak-4242"
COT = "Solve step by step: {{ question }}"
BODY_FAULTS = ("html", "empty-choices", "null-message", "null-content", "not-json", "surrogate")


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr("kdflow.teacher.api_client.BACKOFF_BASE_S", 0.001)


def section(**kw) -> GenerationSection:
    return GenerationSection(**{"splits": ["prompts"], "backend": "openai", **kw})


def stage_rows(n=4):
    return [
        {
            "id": f"p{i}",
            "split": "prompts",
            "question": f"question {i}.",
            "answer": "1",
            "sample": 0,
            "prompt": f"question {i}.",
            "teacher_prompt": f"question {i}.",
        }
        for i in range(n)
    ]


def test_an_unreadable_retry_after_falls_back_to_our_backoff():
    assert retry_after_seconds(httpx.Headers({"retry-after": "soon"})) is None
    assert retry_after_seconds(httpx.Headers({"retry-after": ""})) is None
    assert retry_after_seconds(httpx.Headers({"retry-after": "Wed, 99 Oct 2015 07:28:00 GMT"})) is None  # day 99
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "later", "retry-after": "2"})) == 2.0
    # A date in "-0000" parses without a zone; it is GMT all the same (a local-time reading would be hours off).
    now = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
    date = format_datetime(now + timedelta(hours=1)).replace("+0000", "-0000")
    assert date.endswith("-0000") and retry_after_seconds(httpx.Headers({"retry-after": date}), now.timestamp()) == 3600


def test_a_response_the_client_could_not_validate_is_retried():
    req = httpx.Request("POST", "http://x")
    error = openai.APIResponseValidationError(response=httpx.Response(200, request=req), body=None)
    assert classify(error) == (FailureReason.invalid_response, True)


@pytest.mark.parametrize("fault", MALFORMED)
def test_a_malformed_reply_that_clears_up_is_retried_into_an_answer(tmp_path, fault):
    """Every request is answered with ``fault`` once, then forwarded to the teacher."""
    from kdflow.teacher.generation import api_answers

    rows = stage_rows()
    with FakeTeacher() as fake, FaultProxy(fake.url, rate=1.0, faults=(fault,), first=1) as proxy:
        s = section(api={"base_url": proxy.url + "/v1", "model": "m", "api_key_env": None, "max_retries": 2})
        answers, failures, acct = api_answers(s, "m", rows, tmp_path / "shards")
    assert proxy.faults[fault] == 4 and not failures
    assert sorted(a["text"] for a in answers) == [f"echo: question {i}." for i in range(4)]
    reason = "rate_limited" if fault.startswith("429") else "invalid_response"
    assert acct.answers == 4 and acct.failures == 0 and acct.retries_by_reason == {reason: 4}


@pytest.mark.parametrize("fault", BODY_FAULTS)
def test_a_reply_that_stays_malformed_is_a_failure_row_and_the_stage_completes(prefect_server, tmp_path, fault):
    """The generate stage's body: row p3 is answered with ``fault`` every time; the other three are fine."""
    from kdflow.config.teacher import TeacherSection
    from kdflow.store.outputs import building, existing_output, finish
    from tasks.generate import generate_answers
    from tasks.teacher import use_existing_teacher

    run_dir = tmp_path / "run"
    questions = [{"id": f"p{i}", "question": f"question {i}.", "answer": "1"} for i in range(4)]
    with building(run_dir, "data", "d" * 64) as tmp:
        pd.DataFrame(questions).to_parquet(tmp / "prompts.parquet", index=False)
        finish(tmp, "data", "d" * 64, inputs={}, splits={"prompts": 4})
    teacher = use_existing_teacher.fn(run_dir, TeacherSection(model="hub/teacher"))
    with FakeTeacher() as fake, FaultProxy(fake.url, rate=1.0, faults=(fault,), match="question 3.") as proxy:
        s = section(
            api={
                "base_url": proxy.url + "/v1",
                "model": "m",
                "api_key_env": None,
                "max_retries": 2,
                "max_failure_fraction": 0.25,
            }
        )
        ref = generate_answers.fn(run_dir, s, COT, teacher, existing_output(run_dir, "data", "d" * 64))
    assert proxy.faults[fault] == 3  # the first try and both retries
    assert sorted(pd.read_parquet(f"{ref.path}/answers.parquet")["id"]) == ["p0", "p1", "p2"]
    failures = pd.read_parquet(f"{ref.path}/failures.parquet").to_dict("records")
    assert len(failures) == 1 and failures[0]["id"] == "p3" and failures[0]["reason"] == "invalid_response"
    assert failures[0]["status"] == 200 and failures[0]["attempts"] == 3
    assert failures[0]["raw"] == MALFORMED_BODIES[fault][1].decode()  # the body as the server sent it
    assert fault != "html" or "text/html" in failures[0]["error"]
    manifest = ref.manifest()
    assert manifest["failed"] == 1 and manifest["rows"] == 3
    accounting = manifest["accounting"]
    assert accounting["failures"] == 1 and accounting["failures_by_reason"] == {"invalid_response": 1}
    assert accounting["answers"] == 3 and accounting["retries_by_reason"] == {"invalid_response": 2}


def test_a_malformed_reply_is_kept_redacted_and_cut_to_a_bounded_size():
    page = f"<html>{SENTINEL} " + "x" * 20_000 + "</html>"
    records = []

    async def main():
        handler = lambda request: httpx.Response(200, text=page, headers={"content-type": "text/html"})  # noqa: E731
        async with openai.AsyncOpenAI(
            base_url="http://teacher.test/v1",
            api_key=SENTINEL,
            max_retries=0,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        ) as client:
            request = TeacherRequest(id="r0", sample=0, messages=[{"role": "user", "content": "q"}])
            return await ask_all(
                client,
                [request],
                Sampling(model="m", max_tokens=8),
                concurrency=1,
                max_retries=1,
                on_record=records.append,
                secret=SENTINEL,
            )

    acct = asyncio.run(main())
    (record,) = records
    assert record["ok"] is False and record["reason"] == "invalid_response" and record["attempts"] == 2
    assert SENTINEL not in record["raw"] and record["raw"].startswith("<html>[redacted] xxx")
    assert record["raw"].endswith("more characters]") and len(record["raw"]) < 8_100
    assert acct.failures_by_reason == {"invalid_response": 1} and acct.retries_by_reason == {"invalid_response": 1}


@pytest.mark.parametrize(
    "text, tokens, problem",
    [
        (
            "x" * 5_000_000,
            64,
            r"the reply is 5,000,000 characters, more than 64 tokens \(max_tokens\) of at most 256 "
            "characters each can hold",
        ),
        ("x" * 5_000_000, None, "the reply is 5,000,000 characters"),
        ("7+8=15", 1_250_000, r"the reply is 1250000 completion tokens, over the request's max_tokens 64"),
    ],
)
def test_a_reply_longer_than_max_tokens_allows_is_a_failure_row_not_an_answer(text, tokens, problem):
    """Issue 23, finding 9: a server ignoring the limit sent 5 MB to a 64-token request, and it was kept whole."""
    records = []
    usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": (tokens or 0) + 1} if tokens else None
    body = {
        "id": "big",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "usage": usage,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
    }

    async def main():
        handler = lambda request: httpx.Response(200, json=body)  # noqa: E731
        async with openai.AsyncOpenAI(
            base_url="http://teacher.test/v1",
            api_key="k",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        ) as client:
            request = TeacherRequest(id="r0", sample=0, messages=[{"role": "user", "content": "q"}])
            return await ask_all(
                client,
                [request],
                Sampling(model="m", max_tokens=64),
                concurrency=1,
                max_retries=1,
                on_record=records.append,
            )

    acct = asyncio.run(main())
    (record,) = records
    assert record["ok"] is False and record["reason"] == "invalid_response" and record["attempts"] == 2
    assert re.search(problem, record["error"]), record["error"]
    assert len(record["raw"]) < 8_100 and acct.answers == 0 and acct.failures_by_reason == {"invalid_response": 1}


def test_a_reply_within_max_tokens_is_an_answer():
    from types import SimpleNamespace

    from kdflow.teacher.api_client import answer_record

    response = SimpleNamespace(
        choices=[
            SimpleNamespace(message=SimpleNamespace(content="y" * 256 * 64), finish_reason="length", logprobs=None)
        ],
        usage=SimpleNamespace(prompt_tokens=3, completion_tokens=64),
    )
    request = TeacherRequest(id="r0", sample=0, messages=[])
    assert answer_record(request, response, Sampling(model="m", max_tokens=64))["completion_tokens"] == 64
