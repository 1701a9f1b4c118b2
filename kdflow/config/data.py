"""The ``data`` section: which questions a run starts from (the built-in arithmetic generator or GSM8K files)."""

from __future__ import annotations

import enum

from pydantic import Field, field_validator, model_validator

from kdflow.config.fields import SAFE_NAME, SAFE_NAME_FIX, RecipePath, Strict
from kdflow.config.loading import FieldError


class Difficulty(Strict):
    min_steps: int = Field(2, ge=1)
    max_steps: int = Field(4, ge=1)
    max_operand: int = Field(99, ge=2)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must be <= max_steps ({self.max_steps})")
        return self


class DataSource(str, enum.Enum):
    arithmetic = "arithmetic"  # the built-in demo generator (data/arithmetic.py)
    gsm8k = "gsm8k"  # GSM8K JSONL files (question, answer with '#### N')


class SolutionOrder(str, enum.Enum):
    fixed = "fixed"  # each step written running total first: 15+9=24
    commuted = "commuted"  # each addition's operands in a random order, both valid: 15+9=24 or 9+15=24


class DataSection(Strict):
    source: DataSource
    seed: int = 0
    difficulty: Difficulty = Difficulty()
    solution_order: SolutionOrder = Field(SolutionOrder.fixed, description="arithmetic: commuted writes each addition's "
                                          "operands in a random order (several valid rationales per question, so the "
                                          "teacher's distribution carries something its greedy text does not)")
    # teacher: the teacher's own training data; train: the student's gold set (question + rationale);
    # prompts: extra questions with only a final answer, for the teacher to write rationales for.
    splits: dict[str, int] = Field(description="rows per split")
    path: RecipePath | None = Field(None, description="folder of <split>.jsonl files (gsm8k; a relative path: see "
                                    "fields.PATH_RULE)")

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: dict[str, int]) -> dict[str, int]:
        for name in v:  # each becomes <name>.parquet in the data stage's output, and <name>.jsonl is read
            if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
                raise FieldError(f"split name {name!r}: {SAFE_NAME_FIX} (it becomes a file name: {name}.parquet)", name)
        missing = {"train", "test"} - set(v)
        if missing:
            raise ValueError(f"add the split(s) {sorted(missing)}: students train on 'train', evaluation uses 'test'")
        bad = {k: n for k, n in v.items() if not isinstance(n, int) or n < 1}
        if bad:
            raise ValueError(f"split sizes must be positive integers, got {bad}")
        return v

    @model_validator(mode="after")
    def _path_for_files(self):
        if self.source is DataSource.gsm8k and not self.path:
            raise ValueError("source 'gsm8k' reads local files: set data.path to the folder holding train.jsonl/test.jsonl")
        if self.source is not DataSource.arithmetic and self.solution_order is not SolutionOrder.fixed:
            raise FieldError(f"source {self.source.value!r} has its own rationales; solution_order is for the "
                             "arithmetic generator: remove it", "solution_order")
        return self
