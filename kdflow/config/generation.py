"""How the teacher answers: the ``generation`` section (backend, sampling, an API or a local vLLM server, few-shot
demonstrations) and the ``prompts`` section's chain-of-thought template. The judge of the evaluation section
reuses the backends and the vLLM server settings."""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import ClassVar

from pydantic import (
    Field,
    computed_field,
    field_serializer,
    field_validator,
    model_validator,
)

from kdflow.config.fields import (
    MAX_NEW_TOKENS,
    MAX_SAMPLES,
    ROOT,
    SafeName,
    Strict,
    Template,
    read_template,
    redact_url,
)


class PromptsSection(Strict):
    cot: Template = Field("prompts/cot.jinja", description="chain-of-thought template, relative to the repo")

    def cot_text(self) -> str:
        return (ROOT / self.cot).read_text()


class Backend(str, enum.Enum):
    hf = "hf"  # transformers, batched, in-process (CPUs)
    vllm = "vllm"  # a local vLLM OpenAI-compatible server the stage starts and stops itself
    openai = "openai"  # any OpenAI-compatible API: OpenAI, a vLLM or SGLang server, ...


class Endpoint(str, enum.Enum):
    chat = "chat"  # /v1/chat/completions: the model's chat template applies
    completions = "completions"  # /v1/completions: the rendered prompt is sent as raw text


class ApiSection(Strict):
    """How the stage talks to an OpenAI-compatible endpoint (backends `openai` and `vllm`). The API key is
    read at run time from the environment variable or Prefect Secret block named here, never from the
    recipe, so it appears in no cache key, manifest or log."""

    base_url: str | None = Field(
        None, description="e.g. https://api.openai.com/v1 (openai backend; vllm starts its own)"
    )
    model: str | None = Field(None, description="model name the endpoint serves; default: the teacher's model")
    endpoint: Endpoint = Endpoint.chat
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    api_key_secret_block: str | None = Field(None, description="or: a Prefect Secret block holding it")
    token_ids: bool = Field(False, description="ask for exact token ids with logprobs (vLLM/SGLang servers only)")
    concurrency: int = Field(32, ge=1, description="requests in flight at once")
    timeout_s: float = Field(120.0, gt=0, description="per request")
    max_retries: int = Field(6, ge=0, description="on 429, 5xx, timeouts and dropped connections")
    max_failure_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="the stage fails when more requests than this fail for good"
    )

    @field_serializer("base_url", when_used="json")  # what cache keys and manifests hold: no user:password@
    def _no_password(self, v: str | None) -> str | None:
        return redact_url(v)

    def identity(self) -> dict:
        """Which model answers (an API teacher's name in keys, manifests and the report): no key, no password."""
        return {"model": self.model, "base_url": redact_url(self.base_url), "endpoint": self.endpoint.value}


PYTHON_NAME = re.compile(r"python(\d+(\.\d+)*)?")


class VllmServerSection(Strict):
    """The local vLLM server of the `vllm` backend: started for the stage, stopped after it."""

    python: str = Field(".venv-vllm/bin/python", description="interpreter with vllm installed (relative to the repo)")
    extra_args: list[str] = Field(default_factory=list, description="more api_server flags, e.g. [--dtype, bfloat16]")
    port: int | None = Field(None, ge=1, le=65535, description="default: a free port")
    startup_timeout_s: float = Field(600.0, gt=0)
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="GPUs the served model is split across (vLLM's "
        "--tensor-parallel-size): a teacher too big for one GPU",
    )
    kv_cache_gib: int | None = Field(
        None,
        ge=1,
        description="GiB of KV cache on a CPU (VLLM_CPU_KVCACHE_SPACE); "
        "default: what the model can use, at most half the free memory after its weights",
    )

    @field_validator("python")
    @classmethod
    def _a_python(cls, v: str) -> str:
        # The stage runs this file: it must at least be named like a Python (kdflow/teacher/vllm_server.py also asks it
        # for its version before starting the server).
        if not PYTHON_NAME.fullmatch(Path(v).name):
            raise ValueError(
                f"{v!r} is not a Python interpreter: point it at the python of the virtualenv that has "
                "vllm (e.g. .venv-vllm/bin/python, made by `make vllm`)"
            )
        return v

    @model_validator(mode="after")
    def _one_tp_setting(self):
        if any(a.startswith("--tensor-parallel-size") or a == "-tp" for a in self.extra_args):
            raise ValueError("set tensor_parallel_size, not --tensor-parallel-size in extra_args")
        return self

    def server_args(self) -> list[str]:
        """The api_server flags: ``extra_args`` plus the tensor-parallel size."""
        tp = ["--tensor-parallel-size", str(self.tensor_parallel_size)] if self.tensor_parallel_size > 1 else []
        return [*self.extra_args, *tp]


class IclSection(Strict):
    """Few-shot in-context distillation: the teacher sees `k` solved demonstrations drawn from `pool_split`
    (its gold rationales); the stored training example is the zero-shot prompt with the teacher's answer."""

    k: int = Field(3, ge=1)
    pool_split: SafeName = Field(
        "train", description="split whose questions and gold rationales are the demonstrations"
    )
    template: Template = "prompts/few_shot.jinja"
    seed: int = 0

    @computed_field  # in model_dump, hence in the cache key: editing the template reruns the stage
    @property
    def template_text(self) -> str:
        return read_template(self.template)


class GenerationSection(Strict):
    # Throughput and plumbing, not content: left out of the cache key (a nested dict: pydantic's exclude).
    __throughput_fields__: ClassVar[dict] = {
        "batch_size": True,
        "api": {
            "api_key_env",
            "api_key_secret_block",
            "concurrency",
            "timeout_s",
            "max_retries",
            "max_failure_fraction",
        },
        "vllm": {"python", "port", "startup_timeout_s", "tensor_parallel_size", "kv_cache_gib"},
    }
    backend: Backend = Backend.hf
    splits: list[SafeName] = Field(description="splits whose questions the teacher answers")
    template: Template | None = Field(
        None, description="prompt template (e.g. prompts/instruct.jinja); default: prompts.cot"
    )
    system_prompt: str | None = None
    max_new_tokens: int = Field(96, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_SAMPLES, description="answers sampled per prompt (column `sample`: 0..n-1)")
    seed: int | None = Field(None, description="sampling seed (backends that take one)")
    logprobs: int | None = Field(None, ge=0, description="keep the top-k logprobs of each generated token")
    batch_size: int = Field(256, ge=1)
    api: ApiSection = ApiSection()
    vllm: VllmServerSection = VllmServerSection()
    icl: IclSection | None = None

    @computed_field  # in model_dump, hence in the cache key
    @property
    def template_text(self) -> str | None:
        return read_template(self.template)

    @model_validator(mode="after")
    def _consistent(self):
        if self.n > 1 and self.temperature == 0.0:
            raise ValueError(f"n = {self.n} samples at temperature 0 are all the same answer; set temperature > 0")
        if self.backend is Backend.openai and not self.api.base_url:
            raise ValueError("backend 'openai' needs api.base_url (e.g. https://api.openai.com/v1)")
        if self.backend is Backend.hf:
            unsupported = [f for f in ("system_prompt", "logprobs") if getattr(self, f) is not None]
            unsupported += ["top_p"] if self.top_p != 1.0 else []
            if unsupported:
                raise ValueError(
                    f"backend 'hf' does not support {unsupported}: remove them or use backend 'vllm' or 'openai'"
                )
        if self.logprobs is not None and self.logprobs > 20 and "api.openai.com" in (self.api.base_url or ""):
            raise ValueError(f"logprobs = {self.logprobs}: OpenAI's API returns at most 20 top logprobs; use <= 20")
        return self
