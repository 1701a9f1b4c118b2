"""The ``evaluation`` section: the split and how answers are sampled, the deployment-cost measurement, an
lm-evaluation-harness run and an LLM judge of each student against the teacher."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, computed_field, field_serializer, field_validator, model_validator

from kdflow.config.fields import MAX_NEW_TOKENS, MAX_SAMPLES, SafeName, Strict, Template, read_template, redact_url
from kdflow.config.generation import Backend, VllmServerSection
from kdflow.config.precision import Dtype, dtype_field


class PowerFigure(Strict):
    """A stated average power of the machine while it generates, for the energy estimate where no energy counter is
    readable (kdflow/evaluation/energy.py): energy/token = watts × measured latency/token, labelled "estimated"."""

    watts: float = Field(gt=0, description="average power while generating, in watts")
    source: str = Field(min_length=3, description="where the figure comes from (a data sheet, a wall-meter reading)")


# This project's machines: 2 cores of an AMD EPYC server CPU. The CPU's share only (no DRAM, disks, fans, PSU losses).
DEFAULT_POWER = PowerFigure(
    watts=7.5,
    source="2 cores' share of a server CPU: AMD EPYC 9654, default TDP 360 W over "
    "96 cores = 3.75 W per core (AMD's product page) × 2 cores",
)


class EvaluationSection(Strict):
    class Deployment(Strict):
        """How cost is measured: every model back to back, in one stage run, on the machine running it.
        These settings change the figures measured, so they are part of that stage's key — except ``power``, which
        only turns measured latencies into estimated energy in the report (editing it reruns the report alone)."""

        __throughput_fields__: ClassVar[set[str]] = {"power"}
        latency_tokens: int = Field(32, ge=2, description="tokens each model generates per timed run")
        throughput_batch: int = Field(64, ge=1, description="prompts per batch for throughput and peak memory")
        repeats: int = Field(5, ge=1, description="timed runs per model (models alternate); the median is reported")
        power: PowerFigure = Field(
            DEFAULT_POWER,
            description="for the energy estimate where no counter is readable; give both watts and source",
        )

    class LmEval(Strict):
        """An lm-evaluation-harness run for real-scale models: needs a CUDA GPU and `pip install lm-eval`
        (not a default dependency); where either is missing the report says it was skipped and why."""

        enabled: bool = False
        tasks: list[str] = Field(default_factory=lambda: ["gsm8k"], min_length=1)
        num_fewshot: int | None = Field(None, ge=0)
        limit: int | None = Field(None, ge=1, description="questions per task; None for all (real figures)")

    class Judge(Strict):
        """An LLM judge comparing each student's greedy answers with the teacher's on the evaluation questions
        (for instruction data, where no answer checker exists). Each pair is judged twice, the student's answer
        first as A, then as B, so a judge that prefers a position scores the student ½, not 1 or 0.

        The judge: ``backend: openai``, a model an OpenAI-compatible API serves at ``base_url``; ``backend: vllm``,
        a local model folder (or hub id) served by the stage itself; ``backend: hf``, that folder run in-process.
        A local judge folder is keyed by its files, an API judge by what its server lists for the name at
        ``/v1/models`` (tasks/evaluate.py ``judge_identity``): new weights under the same path or name re-judge."""

        # How fast or with which credentials, not what is judged: left out of the stage's key.
        __throughput_fields__: ClassVar[dict] = {
            **{
                f: True
                for f in (
                    "api_key_env",
                    "api_key_secret_block",
                    "concurrency",
                    "timeout_s",
                    "max_retries",
                    "max_failure_fraction",
                    "batch_size",
                )
            },
            "vllm": {"python", "port", "startup_timeout_s", "tensor_parallel_size", "kv_cache_gib"},
        }
        backend: Backend = Backend.openai
        model: str = Field(description="openai: the served model name; vllm, hf: a local model folder or hub id")
        base_url: str | None = Field(None, description="the API's URL, e.g. https://api.openai.com/v1 (openai only)")
        template: Template = Field("prompts/judge.jinja", description="judge prompt; its reply ends 'Verdict: A|B|tie'")
        max_questions: int | None = Field(None, ge=1, description="the first N questions of the split; None: all")
        max_new_tokens: int = Field(
            256, ge=1, le=MAX_NEW_TOKENS, description="room for the judge's reasoning and its verdict line"
        )
        concurrency: int = Field(16, ge=1, description="requests in flight at once (openai, vllm)")
        batch_size: int = Field(16, ge=1, description="prompts per generate call (hf)")
        api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the API key")
        api_key_secret_block: str | None = Field(None, description="or: a Prefect Secret block holding it")
        timeout_s: float = Field(120.0, gt=0, description="per request")
        max_retries: int = Field(6, ge=0, description="on 429, 5xx, timeouts and dropped connections")
        max_failure_fraction: float = Field(
            0.05, ge=0.0, le=1.0, description="the stage fails when more requests than this fail for good"
        )
        vllm: VllmServerSection = VllmServerSection()

        @computed_field  # in model_dump, hence in the cache key: editing the template re-judges
        @property
        def template_text(self) -> str:
            return read_template(self.template)

        @field_serializer("base_url", when_used="json")  # what cache keys and manifests hold: no user:password@
        def _no_password(self, v: str | None) -> str | None:
            return redact_url(v)

        @model_validator(mode="after")
        def _judge_named(self):
            if self.backend is Backend.openai and not self.base_url:
                raise ValueError(
                    "backend 'openai' needs base_url (e.g. https://api.openai.com/v1); for a local "
                    "model folder use backend 'vllm' or 'hf'"
                )
            if self.backend is not Backend.openai and self.base_url:
                raise ValueError(
                    f"base_url is for backend 'openai'; backend '{self.backend.value}' runs the judge "
                    "itself: remove base_url, or set backend: openai to use a running server"
                )
            if self.backend is not Backend.openai and not Path(self.model).exists() and "/" not in self.model:
                raise ValueError(
                    f"model {self.model!r} is neither a local folder nor a hub id "
                    f"(backend '{self.backend.value}' loads it itself)"
                )
            return self

    # deployment, lm_eval, judge and quantize are handed to their own stages, which key on them; leaving them out of
    # this section's key keeps a new latency setting, judge or quantization from re-running every model's evaluation.
    __throughput_fields__: ClassVar[set[str]] = {"batch_size", "deployment", "lm_eval", "judge", "quantize"}
    split: SafeName = "test"
    max_new_tokens: int = Field(96, ge=1, le=MAX_NEW_TOKENS)
    batch_size: int = Field(256, ge=1)
    pass_at_k: int | None = Field(
        None, ge=1, le=MAX_SAMPLES, description="also report pass@k from `samples` sampled answers"
    )
    samples: int | None = Field(
        None, ge=1, le=MAX_SAMPLES, description="sampled answers per question for pass@k (default: k)"
    )
    temperature: float = Field(0.8, gt=0.0, description="sampling temperature for pass@k")
    deployment: Deployment = Deployment()
    lm_eval: LmEval = LmEval()
    judge: Judge | None = Field(None, description="an LLM judge's win rate of each student against the teacher")
    dtype: Dtype | None = dtype_field("every model evaluated (and the teacher it is compared with) is loaded in it")
    quantize: list[Literal["int8"]] = Field(
        default_factory=list,
        description="post-training quantized copies of every student, evaluated beside it "
        "(`<student>-int8`): int8 = torch dynamic quantization of the Linear layers (CPU)",
    )

    @field_validator("quantize")
    @classmethod
    def _each_once(cls, v: list[str]) -> list[str]:
        twice = sorted({q for q in v if v.count(q) > 1})
        if twice:
            raise ValueError(
                f"{', '.join(twice)} listed more than once: each quantization makes one copy of every "
                "student; list it once"
            )
        return v

    @model_validator(mode="after")
    def _samples_cover_k(self):
        if self.pass_at_k is not None and self.samples is not None and self.samples < self.pass_at_k:
            raise ValueError(
                f"samples ({self.samples}) must be >= pass_at_k ({self.pass_at_k}): "
                "pass@k needs at least k sampled answers per question"
            )
        return self

    @property
    def pass_samples(self) -> int | None:
        return None if self.pass_at_k is None else self.samples or self.pass_at_k
