"""The preflight's plan (which checks the recipe needs, against which server) and the probes that ask the teacher:
HF in this process, a vLLM server (the one the recipe names, or one started here with the flags its stage would
use), an OpenAI-compatible API. ``run_checks`` takes the probes as an argument, so its choices are tested with fakes
and its questions against a real tiny model and the real vLLM server (tests/evaluation/test_preflight.py).

A server kdflow starts for a stage is started here once with that stage's flags: on a CPU that costs a vLLM start
(~25-90 s), the price of checking the very server the capture will ask before it captures anything.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from kdflow.config.fields import redact_url
from kdflow.config.generation import Backend, Endpoint, GenerationSection
from kdflow.config.kd import OnlineKD, OnPolicyKD
from kdflow.config.logit_cache import CaptureSource, LogitCacheSection
from kdflow.config.student import PrunedInit, StudentInit, StudentSection
from kdflow.evaluation import preflight as checks
from kdflow.evaluation.preflight import Check

ANSWER_TOKENS = 32  # enough of an answer to tell two apart, cheap on any API
NO_PREFIX_CACHING = "--no-enable-prefix-caching"


@dataclass(frozen=True)
class Server:
    """A vLLM (or OpenAI-compatible) server a stage of the recipe asks: ``base_url`` None when kdflow starts it for the
    stage with ``args``."""

    role: str  # "generation", "logit cache", "on-policy scoring"
    model: str  # the name it serves the teacher under
    base_url: str | None = None
    args: tuple[str, ...] = ()
    prompt_logprobs: int | None = None  # k asked of it as prompt log-probs (teacher-forced top-k)
    top_logprobs: int | None = None  # k asked of it per generated token (generation.logprobs)
    python: str | None = None  # the interpreter with vLLM, for one kdflow starts (default: kdflow's own choice)
    api_key: Callable[[], str | None] = field(default=lambda: None, compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"{self.role}: {redact_url(self.base_url) if self.base_url else 'vLLM server started by kdflow'}"


@dataclass(frozen=True)
class StudentTokenizer:
    name: str
    source: str | None  # a model folder, hub id or GGUF file; None: the teacher's own tokenizer
    white_box: bool
    gold: bool = False


@dataclass
class Plan:
    teacher_dir: str | None  # the teacher's weights here (None: an API teacher)
    tokenizer_dir: str  # its tokenizer (an API teacher's: the one made for the students)
    generation: GenerationSection
    messages: list[dict]  # one request, as the teacher sees it
    completion: str  # an answer to score the sequence with, where no answer of the teacher's is at hand
    servers: list[Server]
    students: list[StudentTokenizer]
    api_teacher: bool = False
    dtype: str | None = None  # what HF loads the teacher in for the comparison (the capture's)


def make_plan(
    teacher_dir: str | None,
    tokenizer_dir: str,
    generation: GenerationSection,
    logit_cache: LogitCacheSection | None,
    students: list[StudentSection],
    messages: list[dict],
    completion: str,
    generation_key: Callable[[], str | None] = lambda: None,
) -> Plan:
    """What the recipe relies on, from its sections (a recipe's own students, not one per seed)."""
    servers: list[Server] = []
    g = generation
    if g.backend is Backend.vllm:
        servers.append(
            Server(
                "generation",
                str(teacher_dir),
                args=tuple(g.vllm.server_args()),
                top_logprobs=g.logprobs,
                python=g.vllm.python,
            )
        )
    elif g.backend is Backend.openai:
        model = g.api.model or str(teacher_dir)
        servers.append(Server("generation", model, g.api.base_url, top_logprobs=g.logprobs, api_key=generation_key))
    if logit_cache is not None and logit_cache.source is CaptureSource.vllm:
        dtype = logit_cache.dtype.value if logit_cache.dtype is not None else None
        servers.append(_scoring_server("logit cache", teacher_dir, logit_cache.base_url, logit_cache.k, dtype))
    for s in students:
        if isinstance(s.kd, OnPolicyKD) and s.kd.teacher_backend == "vllm":
            servers.append(_scoring_server("on-policy scoring", teacher_dir, s.kd.base_url, s.kd.k))
    servers = list(dict.fromkeys(servers))  # two students scored by the same server: checked once
    compared = teacher_dir is not None and any(s.prompt_logprobs or s.top_logprobs for s in servers)
    return Plan(
        teacher_dir,
        tokenizer_dir,
        generation,
        messages,
        completion,
        servers,
        [_student_tokenizer(s) for s in students],
        api_teacher=teacher_dir is None,
        dtype=_compared_dtype(teacher_dir, logit_cache) if compared else None,
    )


def _compared_dtype(teacher_dir: str, logit_cache: LogitCacheSection | None) -> str | None:
    """The dtype HF computes in for the comparison: the capture's where it names one, else the teacher's own (what a
    server kdflow starts serves it in: ``served_dtype``), so that both sides compute in the same precision."""
    if logit_cache is not None and logit_cache.dtype is not None:
        return logit_cache.dtype.value
    from kdflow.logit_cache.scoring import served_dtype

    dtype = served_dtype(str(teacher_dir))
    return None if dtype in ("auto", "float32") else dtype


def _vllm_key() -> str | None:
    return os.environ.get("VLLM_API_KEY")  # what the capture and the on-policy scorer send


def _scoring_server(role: str, teacher_dir, base_url: str | None, k: int, dtype: str | None = None) -> Server:
    """A server asked for prompt log-probs: the one at ``base_url``, or one started with the flags its stage uses
    (``prompt_logprobs_args``, in ``dtype`` or the teacher's own), less --skip-tokenizer-init: the preflight also asks
    it in text."""
    if base_url:
        return Server(role, str(teacher_dir), base_url, prompt_logprobs=k, api_key=_vllm_key)
    from kdflow.logit_cache.scoring import prompt_logprobs_args, served_dtype

    flags = prompt_logprobs_args(k, dtype or served_dtype(str(teacher_dir)))
    args = tuple(a for a in flags if a != "--skip-tokenizer-init")
    return Server(role, str(teacher_dir), args=args, prompt_logprobs=k, api_key=_vllm_key)


def _student_tokenizer(s: StudentSection) -> StudentTokenizer:
    gold = isinstance(s.kd, OnlineKD) and s.kd.cross_tokenizer == "gold"
    if s.model is None or isinstance(s.init, (PrunedInit, StudentInit)):
        return StudentTokenizer(s.name, None, s.kd is not None, gold)  # from scratch or pruned: the teacher's
    return StudentTokenizer(s.name, s.model, s.kd is not None, gold)


def student_needs(s: StudentSection) -> dict:
    """What the checks read of a student (the preflight's key): not its training knobs."""
    kd = s.kd
    return {
        "name": s.name,
        "model": s.model,
        "init": s.init.model_dump(mode="json", by_alias=True) if s.init is not None else None,
        "kd": kd.method.value if kd is not None else None,
        "cross_tokenizer": getattr(kd, "cross_tokenizer", None),
        "scoring": [kd.teacher_backend, redact_url(kd.base_url), kd.k] if isinstance(kd, OnPolicyKD) else None,
    }


class Probes(Protocol):
    """What ``run_checks`` asks the teacher; ``TeacherProbes`` asks the real one."""

    def hf_answers(self, plan: Plan, n: int) -> list[str]: ...
    def server_answers(self, plan: Plan, server: Server, n: int) -> list[str]: ...
    def hf_topk(self, plan: Plan, completion: str, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def server_topk(self, plan: Plan, server: Server, completion: str, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def server_top_logprobs(self, plan: Plan, server: Server, k: int) -> int: ...
    def prefix_caching(self, server: Server) -> bool | None: ...
    def tokenizer_differences(self, plan: Plan, student: StudentTokenizer) -> list[str]: ...


class ServerRefused(RuntimeError):
    """The server answered a log-prob request with an error (a 400 naming its limit, a reply without log-probs)."""


def run_checks(plan: Plan, probes: Probes, repeats: int = checks.REPEATS) -> list[Check]:
    found = [_repeatable(plan, probes, repeats)]
    answer = found[0].figures.get("answer") or plan.completion
    for server in plan.servers:
        found += _server_checks(plan, probes, server, answer)
    if plan.teacher_dir is None:
        found.append(checks.skipped("backends_agree", "an API teacher: its weights are not here to compare with"))
    elif not plan.servers:
        found.append(
            checks.skipped("backends_agree", "the teacher runs on HF alone in this recipe: nothing to compare")
        )
    found += [_tokenizers(plan, probes, s) for s in plan.students]
    for c in found:
        c.figures.pop("answer", None)
    return found


def _repeatable(plan: Plan, probes: Probes, n: int) -> Check:
    g = plan.generation
    what = f"generation: {g.backend.value}"
    if g.backend is Backend.hf:
        answers = probes.hf_answers(plan, n)
    else:
        answers = probes.server_answers(plan, plan.servers[0], n)
    if g.temperature > 0:
        check = checks.repeatable(what, answers, False, f"sampling at temperature {g.temperature:g}")
    elif plan.api_teacher:
        check = checks.repeatable(what, answers, False, "an API's model, not promised deterministic")
    else:
        check = checks.repeatable(what, answers, True)
    check.figures["answer"] = answers[0] if answers and answers[0] else None
    return check


def _server_checks(plan: Plan, probes: Probes, server: Server, answer: str) -> list[Check]:
    found = []
    if server.top_logprobs:
        try:
            returned = probes.server_top_logprobs(plan, server, server.top_logprobs)
            found.append(checks.enough_logprobs(server.label, server.top_logprobs, returned))
        except ServerRefused as e:
            found.append(checks.enough_logprobs(server.label, server.top_logprobs, None, str(e)))
    if plan.teacher_dir is None:  # an API teacher: no HF side, no prompt log-probs to ask of it
        return found
    if not (server.prompt_logprobs or server.top_logprobs):  # text only: HF's and its log-probs never meet
        why = "the recipe asks this server for text only: no log-probs of it are used"
        return [*found, checks.skipped(f"backends_agree[HF vs {server.label}]", why)]
    k = server.prompt_logprobs or server.top_logprobs
    try:
        other = probes.server_topk(plan, server, answer, k)
    except ServerRefused as e:
        if server.prompt_logprobs:
            return [*found, checks.enough_logprobs(server.label, k, None, str(e))]
        return [
            *found,
            checks.skipped(f"backends_agree[{server.label}]", f"the server gives no prompt log-probs ({e})"),
        ]
    if server.prompt_logprobs:
        found.append(checks.enough_logprobs(server.label, k, int(other[0].shape[1])))
        on = probes.prefix_caching(server)
        how = (
            f"kdflow starts it with {NO_PREFIX_CACHING}"
            if server.base_url is None
            else "its /metrics cache_config_info"
        )
        found.append(checks.prefix_caching(server.label, on, how))
    reference = probes.hf_topk(plan, answer, k)
    found.append(checks.backends_agree(f"HF vs {server.label}", reference, other, checks.tolerance(plan.dtype)))
    return found


def _tokenizers(plan: Plan, probes: Probes, student: StudentTokenizer) -> Check:
    if student.source is None:
        return checks.tokenizers_match(student.name, student.white_box, [])  # it is made with the teacher's
    return checks.tokenizers_match(
        student.name, student.white_box, probes.tokenizer_differences(plan, student), student.gold
    )


class TeacherProbes:
    """The real probes: the HF teacher loaded once, each server kdflow would start started once (stopped by
    ``close``), requests through the openai client."""

    def __init__(self):
        self._stack = contextlib.ExitStack()
        self._urls: dict[tuple, str] = {}
        self._hf = None

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _model(self, plan: Plan):
        if self._hf is None:
            from kdflow.config.precision import Dtype
            from kdflow.teacher.hf_generate import load

            self._hf = load(plan.teacher_dir, Dtype(plan.dtype) if plan.dtype else None)
        return self._hf

    def _url(self, server: Server) -> str:
        if server.base_url:
            return server.base_url
        if server.args not in self._urls:
            from kdflow.teacher.vllm_server import vllm_server

            server_at = vllm_server(server.model, extra_args=server.args, python=server.python)
            self._urls[server.args] = self._stack.enter_context(server_at)
        return self._urls[server.args]

    def _client(self, server: Server):
        import openai

        return openai.OpenAI(
            base_url=self._url(server), api_key=server.api_key() or "EMPTY", max_retries=3, timeout=120
        )

    def hf_answers(self, plan: Plan, n: int) -> list[str]:
        from kdflow.teacher.hf_generate import generate

        model, tokenizer = self._model(plan)
        user = plan.messages[-1]["content"]
        g = plan.generation
        seed = g.seed or 0
        return [
            generate(model, tokenizer, [user], ANSWER_TOKENS, 1, g.temperature, seed + i)[0]["text"] for i in range(n)
        ]

    def server_answers(self, plan: Plan, server: Server, n: int) -> list[str]:
        client, g = self._client(server), plan.generation
        sampling = {"max_tokens": ANSWER_TOKENS, "temperature": g.temperature, "top_p": g.top_p}
        if g.seed is not None:
            sampling["seed"] = g.seed
        answers = []
        for _ in range(n):  # one after another: the same request alone each time, not a batch
            if g.api.endpoint is Endpoint.completions:
                text = "\n\n".join(m["content"] for m in plan.messages)
                answers.append(client.completions.create(model=server.model, prompt=text, **sampling).choices[0].text)
            else:
                reply = client.chat.completions.create(model=server.model, messages=plan.messages, **sampling)
                answers.append(reply.choices[0].message.content or "")
        return answers

    def _row(self, plan: Plan, completion: str):
        from transformers import AutoTokenizer

        from kdflow.logit_cache.topk import encode_row

        tokenizer = AutoTokenizer.from_pretrained(plan.tokenizer_dir)
        return encode_row(tokenizer, "preflight", plan.messages, [{"role": "assistant", "content": completion}])

    def hf_topk(self, plan: Plan, completion: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        from kdflow.logit_cache.topk import hf_topk

        model, tokenizer = self._model(plan)
        got = hf_topk(model, [self._row(plan, completion)], k, 1.0, 16384, tokenizer.pad_token_id or 0)[0]
        return got.ids, got.logprobs

    def server_topk(self, plan: Plan, server: Server, completion: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        import openai

        from kdflow.logit_cache.topk import vllm_topk

        try:
            got = vllm_topk(self._client(server), server.model, [self._row(plan, completion)], k, 1)[0]
        except (openai.APIStatusError, ValueError) as e:
            raise ServerRefused(_message(e)) from e
        return got.ids, got.logprobs

    def server_top_logprobs(self, plan: Plan, server: Server, k: int) -> int:
        import openai

        try:
            reply = self._client(server).chat.completions.create(
                model=server.model, messages=plan.messages, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=k
            )
        except openai.APIStatusError as e:
            raise ServerRefused(_message(e)) from e
        content = reply.choices[0].logprobs.content if reply.choices[0].logprobs else None
        if not content:
            raise ServerRefused("the reply holds no logprobs")
        return min(len(t.top_logprobs) for t in content)

    def prefix_caching(self, server: Server) -> bool | None:
        if server.base_url is None:
            return NO_PREFIX_CACHING not in server.args
        return prefix_caching_on(server.base_url)

    def tokenizer_differences(self, plan: Plan, student: StudentTokenizer) -> list[str]:
        from transformers import AutoTokenizer

        from kdflow.models.gguf import is_gguf_path
        from kdflow.training.tokenizer_compat import tokenizer_differences

        teacher = AutoTokenizer.from_pretrained(plan.tokenizer_dir)
        if is_gguf_path(student.source):
            from kdflow.config.fields import ROOT

            path = ROOT / student.source
            other = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            other = AutoTokenizer.from_pretrained(student.source)
        found = tokenizer_differences(teacher, other)
        rendered = [
            t.apply_chat_template(plan.messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
            for t in (teacher, other)
        ]
        return found + [d for d in [checks.rendered_difference(*rendered)] if d]


CACHE_CONFIG = re.compile(r'^vllm:cache_config_info\{[^}]*enable_prefix_caching="(\w+)"', re.MULTILINE)


def prefix_caching_on(base_url: str) -> bool | None:
    """Whether the vLLM server at ``base_url`` (``.../v1``) caches prefixes, from its Prometheus metrics
    (``vllm:cache_config_info``); None where the server has no such metric (not vLLM, or metrics off)."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(f"{root}/metrics", timeout=30) as response:
            text = response.read().decode()
    except OSError:
        return None
    return prefix_caching_in(text)


def prefix_caching_in(metrics: str) -> bool | None:
    """``enable_prefix_caching`` of vLLM's ``cache_config_info`` metric in a /metrics page; None when it is absent."""
    match = CACHE_CONFIG.search(metrics)
    return None if match is None else match.group(1) == "True"


def _message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error", {}).get("message") or e)
    return str(e)
