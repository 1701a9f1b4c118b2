"""The ``filters`` section: which teacher answers are kept for the students (correctness, length, patterns,
self-consistency, near-duplicates, an LLM judge's score); a dropped row keeps its reasons."""

from __future__ import annotations

import enum
import re
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from kdflow.config.fields import ROOT, Strict, Template


class LengthFilter(Strict):
    min_tokens: int = Field(1, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    tokenizer: str | None = Field(
        None,
        description="the student's tokenizer (folder or hub id); unset: the "
        "answers' completion_tokens (the teacher's tokenizer, which the demo's students share)",
    )

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be >= min_tokens ({self.min_tokens})")
        return self


REFUSALS = [
    r"\bI(?: a|')m (?:sorry|unable)\b",
    r"\bI can(?:no|')t (?:help|assist|answer|provide)\b",
    r"\bas an AI\b",
    r"\bI (?:won't|will not) (?:help|answer)\b",
]


def _regex(v: str) -> str:
    try:
        re.compile(v)
    except re.error as e:
        raise ValueError(f"not a valid regular expression ({e}): {v!r}") from None
    return v


class PatternFilter(Strict):
    refusal: list[str] = Field(default_factory=lambda: list(REFUSALS), description="regexes (case-insensitive)")
    required: str | None = Field(None, description="a regex every kept answer must match, e.g. '#### '")

    @field_validator("refusal")
    @classmethod
    def _refusals(cls, v: list[str]) -> list[str]:
        return [_regex(p) for p in v]

    @field_validator("required")
    @classmethod
    def _required(cls, v: str | None) -> str | None:
        return v if v is None else _regex(v)


class DedupOn(str, enum.Enum):
    text = "text"  # the answer alone
    question = "question"  # the prompt alone (one answer per distinct question)
    question_and_text = "question_and_text"  # the pair: n different samples of one question all stay


class DedupFilter(Strict):
    exact: bool = True
    near: bool = True
    by: DedupOn = Field(DedupOn.question_and_text, description="what two rows must share to be copies")
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="MinHash Jaccard of word n-grams that counts as near")
    ngram: int = Field(3, ge=1)
    num_perm: int = Field(128, ge=16)


class SelectPolicy(str, enum.Enum):
    all = "all"  # every correct (or majority) sample
    shortest = "shortest"  # the shortest one
    best_k = "best_k"  # the k shortest, distinct texts


class SelfConsistency(Strict):
    """n samples per prompt: keep the correct ones (or, without gold, those with the majority answer)."""

    policy: SelectPolicy = SelectPolicy.all
    k: int = Field(1, ge=1, description="samples kept per prompt with policy best_k")


class JudgeFilter(Strict):
    template: Template = Field("prompts/judge_filter.jinja", description="judge prompt; its reply ends 'Score: N'")
    threshold: float = Field(6.0, description="answers scored below this are dropped")
    max_new_tokens: int = Field(64, ge=1)

    def template_text(self) -> str:
        return (ROOT / self.template).read_text()


class FiltersSection(Strict):
    """Every filter is optional; a dropped row keeps its text and reason codes in dropped.parquet."""

    __throughput_fields__: ClassVar[set[str]] = {"judge_batch_size"}
    correctness: bool = Field(True, description="drop answers whose final answer differs from the gold one")
    truncated: bool = Field(True, description="drop answers cut at the token limit (finish_reason 'length')")
    empty: bool = Field(True, description="drop empty answers")
    length: LengthFilter | None = None
    patterns: PatternFilter | None = None
    self_consistency: SelfConsistency | None = None
    dedup: DedupFilter | None = None
    judge: JudgeFilter | None = None
    judge_batch_size: int = Field(64, ge=1)
