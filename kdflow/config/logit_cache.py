"""The ``logit_cache`` section: the teacher's top-k distributions captured once for offline KD, and how they are
stored (kdflow/logit_cache/format.py reads ``ValueEncoding`` from here, so that a recipe loads without torch)."""

from __future__ import annotations

import enum
from typing import ClassVar

from pydantic import Field, field_serializer, model_validator

from kdflow.config.fields import Strict, redact_url
from kdflow.config.precision import Dtype, dtype_field


class ValueEncoding(str, enum.Enum):
    fp16 = "fp16"  # log-probs as float16: 2 bytes each
    u8 = "u8"  # log-probs on a 1/12-nat grid: 1 byte each


class CaptureSource(str, enum.Enum):
    hf = "hf"  # the teacher's own forward pass (transformers, batched): exact tail mass, any temperature
    vllm = "vllm"  # a vLLM server's prompt_logprobs (teacher-forced; started for the teacher if no base_url)
    api = "api"  # the top_logprobs an API returned while generating (gray-box KD; generation.logprobs, k <= 20)


class EnsembleMember(Strict):
    model: str = Field(description="a local model folder sharing the teacher's tokenizer")
    weight: float = Field(1.0, gt=0.0)


class LogitCacheSection(Strict):
    """The teacher's top-k distributions on the kept answers, captured once for KD from disk
    (kdflow/logit_cache/format.py). Sizes per answer token: docs/results/benchmarks.md."""

    # How fast, or where from, not what: left out of the stage's key.
    __throughput_fields__: ClassVar[set[str]] = {"batch_tokens", "concurrency", "base_url", "timeout_s"}
    source: CaptureSource = CaptureSource.hf
    k: int = Field(20, ge=1, description="token ids and log-probs kept per position")
    temperature: float = Field(1.0, gt=0.0, description="capture temperature: softmax(z / T)")
    value_encoding: ValueEncoding = Field(ValueEncoding.u8, description="u8 (1 byte, error <= 1/24 nat) or fp16")
    shard_rows: int = Field(1024, ge=1, description="rows per shard: the unit a crashed capture resumes from")
    teacher_weight: float = Field(1.0, gt=0.0, description="the teacher's weight when `ensemble` adds members")
    ensemble: list[EnsembleMember] = Field(default_factory=list, description="more teachers (source hf only)")
    batch_tokens: int = Field(16384, ge=16, description="padded tokens per forward pass (hf)")
    concurrency: int = Field(8, ge=1, description="requests in flight (vllm)")
    base_url: str | None = Field(None, description="a running vLLM server serving the teacher (vllm)")
    timeout_s: float = Field(
        600.0,
        gt=0,
        description="seconds one try of a request may go unanswered (vllm): a "
        "server that accepts and never replies fails the capture instead of holding it forever",
    )
    dtype: Dtype | None = dtype_field(
        "the teacher's precision during capture (hf: loaded in it; vllm: served in it; log-probs in float32 either way)"
    )

    @field_serializer("base_url", when_used="json")  # what cache keys and manifests hold: no user:password@
    def _no_password(self, v: str | None) -> str | None:
        return redact_url(v)

    @model_validator(mode="after")
    def _source_limits(self):
        if self.source is not CaptureSource.hf and self.temperature != 1.0:
            raise ValueError(
                f"temperature {self.temperature} needs source 'hf': {self.source.value} gives only the "
                "top-k at T = 1, and rescaling needs the whole distribution"
            )
        if self.source is not CaptureSource.hf and self.ensemble:
            raise ValueError("ensemble members are captured with source 'hf'; set source: hf")
        if self.source is CaptureSource.api and self.dtype is not None:
            raise ValueError("dtype: with source 'api' the API's own model made the logprobs; remove dtype")
        if self.source is CaptureSource.vllm and self.base_url and self.dtype is not None:
            raise ValueError(
                "dtype: a running server (base_url) serves in the dtype it was started with; remove "
                "dtype, or remove base_url to let the stage start the server in that dtype"
            )
        if self.source is CaptureSource.api and self.k > 20:
            raise ValueError(f"k={self.k}: APIs return at most 20 top_logprobs; use k <= 20")
        return self
