"""Asking a teacher behind an OpenAI-compatible API (OpenAI, a vLLM or SGLang server, ...) with the official
async ``openai`` client: bounded concurrency, a timeout per request, and retries with exponential backoff and
full jitter on 429 / 408 / 409 / 5xx / timeouts / dropped connections (Retry-After honoured).

The client's own retries are off (``max_retries=0``) so that every retry is counted here and waits as the
server asks. Errors split three ways:

- transient (429, 408, 409, 5xx, timeout, connection, and a 2xx that is no completion: HTML from a proxy,
  ``choices: []``, a null message or content, a body that is not JSON): retried; after ``max_retries`` the
  request is a failure *row* with its reason code and the server's message (and, for a malformed 2xx, the
  raw body);
- this request is wrong (400, 413, 422, ...): not retried; a failure row;
- the whole run is wrong (401 bad key, 403 forbidden, 404 no such model or endpoint): ``FatalApiError`` at
  once, the other requests cancelled: retrying cannot help and every row would fail the same way.

The API key never appears in what this module raises or returns: messages pass through ``redact``.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import enum
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import httpx
import openai

from kdflow.config.generation import Endpoint

BACKOFF_BASE_S, BACKOFF_CAP_S = 0.5, 30.0
RETRY_AFTER_CAP_S = 300.0  # a server asking for longer than this is treated as asking for this
RETRYABLE_STATUS = {408, 409, 429}  # and every 5xx
FATAL_STATUS = {
    401: "the API key was rejected",
    403: "the API key may not use this model or endpoint",
    404: "no such model or endpoint",
}
TOKEN_ID = re.compile(r"token_id:(\d+)")  # vLLM's spelling of a token with return_tokens_as_token_ids


class FailureReason(str, enum.Enum):
    rate_limited = "rate_limited"  # 429, still after every retry
    server_error = "server_error"  # 5xx (or 408/409), still after every retry
    timeout = "timeout"  # no answer within the timeout, every try
    connection = "connection"  # the connection failed or dropped, every try
    bad_request = "bad_request"  # 400/413/422...: the server rejects this request; not retried
    invalid_response = "invalid_response"  # a 2xx that is no completion, still after every retry


RAW_KEEP_CHARS = 8_000  # of a malformed reply's body kept in its failure row: a proxy's HTML page can be large
# The longest text one token can decode to, generously: real vocabularies' longest tokens are runs of ~100 spaces or
# dashes. A reply longer than this many characters per max_tokens did not come from a server that kept the limit.
MAX_CHARS_PER_TOKEN = 256


class FatalApiError(RuntimeError):
    """An error no retry and no other row can fix (bad key, forbidden, unknown model): stop the run."""


class InvalidResponse(Exception):
    """A 2xx reply that is not a completion. Retried like a transient error: it comes from a proxy's error page
    or an overloaded server far more often than from this request, and the next try is usually fine."""

    def __init__(self, problem: str, raw: str | None, status: int | None, headers=None):
        super().__init__(problem)
        self.raw, self.status, self.headers = raw, status, headers


@dataclass(frozen=True)
class TeacherRequest:
    """One request: one sample of one row. ``messages`` for the chat endpoint, ``prompt`` for completions."""

    id: str
    sample: int
    messages: list[dict] | None = None
    prompt: str | None = None


@dataclass(frozen=True)
class Sampling:
    model: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # each sample asks with seed + sample, so samples differ and each is reproducible
    logprobs: int | None = None  # top-k per generated token
    token_ids: bool = False  # vLLM/SGLang: tokens as exact ids
    endpoint: Endpoint = Endpoint.chat


@dataclass
class RequestAccounting:
    """What the run cost: HTTP attempts, retries, failures for good, tokens, answers, wall time."""

    requests: int = 0
    retries: int = 0
    failures: int = 0
    answers: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    resumed: int = 0  # answers an earlier (crashed or killed) run had already persisted: not asked again
    retries_by_reason: dict[str, int] = field(default_factory=dict)
    failures_by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 2)
        out["requests_per_second"] = round((self.answers + self.failures) / self.seconds, 2) if self.seconds else None
        out["completion_tokens_per_second"] = round(self.completion_tokens / self.seconds, 1) if self.seconds else None
        return out


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "[redacted]") if secret else text


def retry_after_seconds(headers, now: float | None = None) -> float | None:
    """The server's requested wait: ``retry-after-ms`` (OpenAI), ``retry-after`` in seconds or as an HTTP date
    (counted from ``now``, a Unix time: the clock unless given)."""
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):  # "soon", "", a day 32: the server's wish is unreadable, so our own backoff
        return None
    if when.tzinfo is None:  # "-0000" parses to a naive datetime; RFC 9110 dates are GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_seconds(attempt: int, retry_after: float | None, rng: random.Random) -> float:
    """Wait before retry ``attempt`` (0-based): what the server asked, else full jitter on an exponential."""
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP_S)
    return rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


def classify(error: Exception) -> tuple[FailureReason | None, bool]:
    """(reason, retryable). A fatal error (401/403/404) is raised as ``FatalApiError`` by the caller."""
    if isinstance(error, openai.APITimeoutError):  # before APIConnectionError: it is a subclass
        return FailureReason.timeout, True
    if isinstance(error, openai.APIConnectionError):
        return FailureReason.connection, True
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        if status == 429:
            return FailureReason.rate_limited, True
        if status >= 500 or status in RETRYABLE_STATUS:
            return FailureReason.server_error, True
        return FailureReason.bad_request, False
    if isinstance(error, openai.APIResponseValidationError):
        return FailureReason.invalid_response, True
    raise TypeError(f"not an API error: {type(error).__name__}")


def _token_id(token: str) -> int | None:
    m = TOKEN_ID.fullmatch(token)
    return int(m.group(1)) if m else None


def parse_chat_logprobs(content: list) -> dict:
    """Chat ``choice.logprobs.content`` -> per generated token: token, id (when given), logprob, and top-k."""
    tokens = [t.token for t in content]
    ids = [_token_id(t) for t in tokens]
    top_tokens = [[a.token for a in t.top_logprobs or []] for t in content]
    top_ids = [[_token_id(a) for a in row] for row in top_tokens]
    have_ids = bool(ids) and all(i is not None for i in ids) and all(i is not None for row in top_ids for i in row)
    return {
        "tokens": tokens,
        "token_ids": ids if have_ids else None,
        "token_logprobs": [t.logprob for t in content],
        "top_tokens": top_tokens,
        "top_ids": top_ids if have_ids else None,
        "top_logprobs": [[a.logprob for a in t.top_logprobs or []] for t in content],
    }


def parse_completion_logprobs(lp) -> dict:
    """Completions ``choice.logprobs`` (tokens, token_logprobs, top_logprobs as dicts) in the same shape."""
    tokens = list(lp.tokens or [])
    tops = [sorted((d or {}).items(), key=lambda kv: -kv[1]) for d in (lp.top_logprobs or [])]
    ids = [_token_id(t) for t in tokens]
    top_ids = [[_token_id(t) for t, _ in row] for row in tops]
    have_ids = bool(ids) and all(i is not None for i in ids) and all(i is not None for row in top_ids for i in row)
    return {
        "tokens": tokens,
        "token_ids": ids if have_ids else None,
        "token_logprobs": list(lp.token_logprobs or []),
        "top_tokens": [[t for t, _ in row] for row in tops],
        "top_ids": top_ids if have_ids else None,
        "top_logprobs": [[v for _, v in row] for row in tops],
    }


async def _create(client: openai.AsyncOpenAI, request: TeacherRequest, s: Sampling):
    """The raw HTTP response (``.parse()`` gives the completion), so that a malformed body keeps its text."""
    kwargs = {"model": s.model, "max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "n": 1}
    if s.seed is not None:
        kwargs["seed"] = s.seed + request.sample
    if s.token_ids:
        kwargs["extra_body"] = {"return_tokens_as_token_ids": True}
    if s.endpoint is Endpoint.chat:
        if s.logprobs is not None:
            kwargs |= {"logprobs": True, "top_logprobs": s.logprobs}
        return await client.chat.completions.with_raw_response.create(messages=request.messages, **kwargs)
    if s.logprobs is not None:
        kwargs["logprobs"] = s.logprobs
    return await client.completions.with_raw_response.create(prompt=request.prompt, **kwargs)


def completion_text(response, s: Sampling) -> str:
    """The first choice's text; ``InvalidResponse`` naming what is missing when the body is no completion."""
    if not hasattr(response, "choices"):  # the client hands back a non-JSON body (an HTML page) as a plain str
        raise InvalidResponse("the body is not a completion", None, None)
    if not response.choices:
        raise InvalidResponse("the completion has no choices (choices: [])", None, None)
    choice = response.choices[0]
    if s.endpoint is not Endpoint.chat:
        if choice.text is None:
            raise InvalidResponse("the choice's text is null", None, None)
        return whole_text(choice.text)
    if choice.message is None:
        raise InvalidResponse("the choice's message is null", None, None)
    if choice.message.content is None:
        refusal = getattr(choice.message, "refusal", None)
        raise InvalidResponse(f"the message's content is null{f' (refusal: {refusal})' if refusal else ''}", None, None)
    return whole_text(choice.message.content)


def whole_text(text: str) -> str:
    """``text`` if it is valid Unicode: a JSON body may escape a lone surrogate (\\ud800), which no parquet file can
    hold; such a reply is malformed (retried, then a failure row), not an answer that fails the stage's write."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidResponse(f"the text holds a lone surrogate at character {e.start}", None, None) from None
    return text


def read_reply(raw, request: TeacherRequest, s: Sampling) -> dict:
    """The answer record of a 2xx ``raw`` response, or ``InvalidResponse`` carrying its body and headers."""
    http = raw.http_response
    try:
        return answer_record(request, raw.parse(), s)
    except InvalidResponse as e:
        problem = str(e)
    # The client builds response objects without validation, so any field can hold anything (a string of
    # usage, logprobs of the wrong shape); reading them fails with one of these.
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as e:  # ValueError: JSONDecodeError
        problem = f"unreadable completion ({type(e).__name__}: {e})"
    kind = http.headers.get("content-type", "no content-type")
    raise InvalidResponse(f"HTTP {http.status_code} ({kind}): {problem}", http.text, http.status_code, http.headers)


def answer_record(request: TeacherRequest, response, s: Sampling) -> dict:
    text = completion_text(response, s)
    choice = response.choices[0]
    chat = s.endpoint is Endpoint.chat
    usage = response.usage
    check_length(text, usage.completion_tokens if usage else None, s.max_tokens)
    record = {
        "id": request.id,
        "sample": request.sample,
        "ok": True,
        "text": text,
        "finish_reason": choice.finish_reason or "unknown",
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
    }
    if s.logprobs is not None and choice.logprobs is not None:
        record["logprobs"] = (
            parse_chat_logprobs(choice.logprobs.content or []) if chat else parse_completion_logprobs(choice.logprobs)
        )
    return record


def check_length(text: str, completion_tokens, max_tokens: int) -> None:
    """``InvalidResponse`` for a reply longer than the request allowed: a server that ignores ``max_tokens`` (a
    proxy, a misconfigured deployment) sent 5 MB to a 64-token limit, and it was kept whole as an answer. Its own
    token count is checked, and, since that may be missing or wrong, its length against ``MAX_CHARS_PER_TOKEN``."""
    if isinstance(completion_tokens, int) and completion_tokens > max_tokens:
        raise InvalidResponse(
            f"the reply is {completion_tokens} completion tokens, over the request's max_tokens {max_tokens}",
            None,
            None,
        )
    if len(text) > MAX_CHARS_PER_TOKEN * max_tokens:
        raise InvalidResponse(
            f"the reply is {len(text):,} characters, more than {max_tokens} tokens (max_tokens) of "
            f"at most {MAX_CHARS_PER_TOKEN} characters each can hold",
            None,
            None,
        )


def kept_raw(raw: str | None, secret: str | None) -> str | None:
    if raw is not None:  # storable whatever it holds: a lone surrogate becomes its escape
        raw = raw.encode("utf-8", "backslashreplace").decode("utf-8")
    if raw is None:
        return None
    raw = redact(raw, secret)
    return (
        raw
        if len(raw) <= RAW_KEEP_CHARS
        else f"{raw[:RAW_KEEP_CHARS]}[... {len(raw) - RAW_KEEP_CHARS} more characters]"
    )


async def ask(
    client: openai.AsyncOpenAI,
    request: TeacherRequest,
    s: Sampling,
    max_retries: int,
    acct: RequestAccounting,
    rng: random.Random,
    secret: str | None = None,
) -> dict:
    """One answer record, or a failure record (``ok`` False, ``reason``, ``status``, ``error``, ``attempts``, and
    ``raw``: the body of a malformed 2xx, else None)."""
    for attempt in range(max_retries + 1):
        acct.requests += 1
        raw = None
        try:
            record = read_reply(await _create(client, request, s), request, s)
        except openai.APIError as e:
            status = getattr(e, "status_code", None)
            if status in FATAL_STATUS:
                raise FatalApiError(
                    f"the teacher API at {client.base_url} answered {status} "
                    f"({FATAL_STATUS[status]}): {redact(str(e), secret)}"
                ) from None
            reason, retryable = classify(e)
            error = f"{type(e).__name__}: {e}"
            response = getattr(e, "response", None)  # status errors carry one; timeouts and dropped connections not
            headers = response.headers if response is not None else None
        except InvalidResponse as e:
            reason, retryable, status, headers, raw = FailureReason.invalid_response, True, e.status, e.headers, e.raw
            error = f"InvalidResponse: {e}"
        else:
            break
        if not retryable or attempt == max_retries:
            acct.failures += 1
            acct.failures_by_reason[reason.value] = acct.failures_by_reason.get(reason.value, 0) + 1
            return {
                "id": request.id,
                "sample": request.sample,
                "ok": False,
                "reason": reason.value,
                "status": status,
                "error": redact(error, secret),
                "attempts": attempt + 1,
                "raw": kept_raw(raw, secret),
            }
        acct.retries += 1
        acct.retries_by_reason[reason.value] = acct.retries_by_reason.get(reason.value, 0) + 1
        await asyncio.sleep(backoff_seconds(attempt, retry_after_seconds(headers), rng))
    else:
        raise AssertionError("unreachable: the last attempt returns a failure record")
    acct.answers += 1
    acct.prompt_tokens += record["prompt_tokens"] or 0
    acct.completion_tokens += record["completion_tokens"] or 0
    return record


async def ask_all(
    client: openai.AsyncOpenAI,
    requests: Iterable[TeacherRequest],
    s: Sampling,
    *,
    concurrency: int,
    max_retries: int,
    on_record: Callable[[dict], None],
    on_progress: Callable[[RequestAccounting], None] | None = None,
    secret: str | None = None,
    seed: int = 0,
    resumed: int = 0,
) -> RequestAccounting:
    """Ask every request with at most ``concurrency`` in flight; ``on_record`` gets each answer or failure
    record as it arrives (persist it there). A ``FatalApiError`` cancels the requests in flight and propagates."""
    acct, rng, pending = RequestAccounting(resumed=resumed), random.Random(seed), iter(requests)
    start = time.perf_counter()

    async def worker():
        # Workers pull from one iterator (single-threaded event loop: no lock needed), so memory stays
        # bounded by the concurrency, not by the number of requests.
        while (request := next(pending, None)) is not None:
            record = await ask(client, request, s, max_retries, acct, rng, secret)
            on_record(record)
            acct.seconds = time.perf_counter() - start
            if on_progress is not None:
                on_progress(acct)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker())
    except* FatalApiError as eg:
        raise eg.exceptions[0] from None
    acct.seconds = time.perf_counter() - start
    return acct


def run_all(
    base_url: str, api_key: str | None, timeout_s: float, requests: Iterable[TeacherRequest], s: Sampling, **kwargs
) -> RequestAccounting:
    """``ask_all`` from synchronous code, with a client built (and closed) here."""

    async def main():
        limits = httpx.Limits(
            max_connections=kwargs["concurrency"] + 8, max_keepalive_connections=kwargs["concurrency"] + 8
        )
        async with openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "EMPTY",
            timeout=timeout_s,
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout_s),
        ) as client:
            return await ask_all(client, requests, s, secret=api_key, **kwargs)

    return asyncio.run(main())
