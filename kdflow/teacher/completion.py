"""One way to ask a teacher (or a judge) for completions, whichever backend the recipe names — written once, for
generation, the LLM judge and the judge filter:

- ``hf``: transformers, batched greedy or sampled generation in this process (CPUs, small models);
- ``vllm``: a local vLLM server started for the call and stopped after it, asked through the OpenAI client;
- ``openai``: any OpenAI-compatible API.

``TeacherBackend.hf_generate`` and ``TeacherBackend.run`` are the two ways in (in-process, or per request with
retries, persisted records and accounting); ``ask`` (prompts by id, greedy) and ``completer`` (prompts -> replies)
are built on them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from kdflow.config.generation import Backend, VllmServerSection
from kdflow.config.templates import plain_messages, special_strings
from kdflow.teacher.api_client import RequestAccounting, Sampling, TeacherRequest, run_all
from kdflow.teacher.vllm_server import vllm_server


@dataclass(frozen=True)
class TeacherBackend:
    backend: Backend
    model: str  # hf, vllm: a model folder or hub id (vLLM serves it under that name); openai: the served name
    base_url: str | None = None  # openai only
    # Called only when a request is about to be sent, so that a stage with nothing left to ask needs no key.
    api_key: Callable[[], str | None] = lambda: None
    timeout_s: float = 120.0
    concurrency: int = 16
    max_retries: int = 6
    batch_size: int = 16  # prompts per generate call (hf)
    vllm: VllmServerSection = field(default_factory=VllmServerSection)

    def hf_generate(self, prompts: list[str], max_new_tokens: int, **sampling) -> tuple[list[dict], RequestAccounting]:
        """Every prompt answered in this process: one output per prompt (``text``, ``finish_reason``,
        ``completion_tokens``...), and what it cost. ``sampling``: hf_generate.generate's temperature, seed."""
        from kdflow.teacher.hf_generate import TOO_LONG, generate, load

        model, tokenizer = load(self.model)
        start = time.perf_counter()
        outputs = generate(model, tokenizer, prompts, max_new_tokens, self.batch_size, **sampling)
        too_long = sum(o["finish_reason"] == TOO_LONG for o in outputs)  # not run: failures, as a server's 400
        return outputs, RequestAccounting(
            requests=len(prompts),
            answers=len(prompts) - too_long,
            failures=too_long,
            failures_by_reason={"bad_request": too_long} if too_long else {},
            seconds=time.perf_counter() - start,
            completion_tokens=sum(o["completion_tokens"] for o in outputs),
        )

    def run(self, requests: Iterable[TeacherRequest], sampling: Sampling, **run) -> RequestAccounting:
        """Every request through the API, or through a vLLM server started here for them and stopped after
        (backend vllm). ``run``: ``run_all``'s own arguments (on_record, on_progress, seed, resumed)."""
        run = {"concurrency": self.concurrency, "max_retries": self.max_retries, **run}
        if self.backend is Backend.vllm:
            v = self.vllm
            requests = plain_requests(requests, self.model)
            with vllm_server(
                self.model,
                port=v.port,
                extra_args=v.server_args(),
                python=v.python,
                startup_timeout_s=v.startup_timeout_s,
                kv_cache_gib=v.kv_cache_gib,
            ) as base_url:
                return run_all(base_url, None, self.timeout_s, requests, sampling, **run)
        if self.backend is Backend.hf:
            raise ValueError("backend hf answers in process (hf_generate), not per request")
        return run_all(self.base_url, self.api_key(), self.timeout_s, requests, sampling, **run)

    def ask(
        self, prompts: dict[str, str], max_new_tokens: int, on_record: Callable[[dict], None], system: str | None = None
    ) -> RequestAccounting:
        """Each prompt (id -> user message) answered greedily, its record (``id``, ``sample`` 0, ``ok``, ``text``...
        or a failure with its ``reason``) handed to ``on_record`` as it arrives. ``system``: a system message before
        each (API backends)."""
        if self.backend is Backend.hf:
            if system:
                raise ValueError("backend hf takes no system prompt")
            outputs, acct = self.hf_generate(list(prompts.values()), max_new_tokens)
            for i, o in zip(prompts, outputs):
                on_record({"id": i, "sample": 0, "ok": True, **o})
            return acct
        first = [{"role": "system", "content": system}] if system else []
        requests = [
            TeacherRequest(id=i, sample=0, messages=[*first, {"role": "user", "content": p}])
            for i, p in prompts.items()
        ]
        return self.run(requests, Sampling(model=self.model, max_tokens=max_new_tokens), on_record=on_record)

    def completer(self, max_new_tokens: int) -> Callable[[list[str]], list[str]]:
        """prompts -> replies, greedy (the judge filter's signature). An hf model is loaded once, here."""
        if self.backend is Backend.hf:
            from kdflow.teacher.hf_generate import generate, load

            model, tokenizer = load(self.model)
            return lambda prompts: [
                o["text"] for o in generate(model, tokenizer, prompts, max_new_tokens, self.batch_size)
            ]

        def complete(prompts: list[str]) -> list[str]:
            records = {}
            self.ask({str(i): p for i, p in enumerate(prompts)}, max_new_tokens, lambda r: records.update({r["id"]: r}))
            return [records[str(i)].get("text") for i in range(len(prompts))]

        return complete


def plain_requests(requests: Iterable[TeacherRequest], model: str) -> Iterator[TeacherRequest]:
    """``requests`` whose messages hold no special token of ``model``'s tokenizer (``templates.plain_text``): a vLLM
    server applies the chat template and tokenizes with special tokens parsed, as HF generation did. (An API's
    own server is its business: OpenAI's treat message text as text.)"""
    from transformers import AutoTokenizer

    specials = special_strings(AutoTokenizer.from_pretrained(model))
    for r in requests:
        yield replace(r, messages=plain_messages(r.messages, specials)) if r.messages else r
