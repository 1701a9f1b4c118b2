"""The ``data`` section: which questions a run starts from (the built-in arithmetic generator, GSM8K files, or
instruction files: free-text prompts with reference answers)."""

from __future__ import annotations

import enum
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from kdflow.config.fields import MAX_ROWS, PATH_RULE, ROOT, SAFE_NAME, SAFE_NAME_FIX, RecipePath, Strict
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
    instructions = "instructions"  # free-text prompts with reference answers (data/instructions.py): no answer checker


class SolutionOrder(str, enum.Enum):
    fixed = "fixed"  # each step written running total first: 15+9=24
    commuted = "commuted"  # each addition's operands in a random order, both valid: 15+9=24 or 9+15=24


class DataSection(Strict):
    source: DataSource
    seed: int = 0
    difficulty: Difficulty = Difficulty()
    solution_order: SolutionOrder = Field(
        SolutionOrder.fixed,
        description="arithmetic: commuted writes each addition's "
        "operands in a random order (several valid rationales per question, so the "
        "teacher's distribution carries something its greedy text does not)",
    )
    # teacher: the teacher's own training data; train: the student's gold set (question + rationale);
    # prompts: extra questions with only a final answer, for the teacher to write rationales for.
    splits: dict[str, int] = Field(description="rows per split")
    path: RecipePath | None = Field(
        None, description="folder of <split>.jsonl files (gsm8k; a relative path: see fields.PATH_RULE)"
    )
    transfer: RecipePath | None = Field(
        None,
        description="instructions: the transfer prompts, one {id, prompt, "
        "completion} a line (e.g. data/t0-short/prompts.jsonl); every split but test "
        "is drawn from it, disjoint, seeded by data.seed",
    )
    test: RecipePath | None = Field(
        None,
        description="instructions: the test split's file in Self-Instruct's format, "
        "{id, instruction, instances: [{input, output}]} a line (e.g. "
        "data/self-instruct/user_oriented_instructions.jsonl)",
    )

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: dict[str, int]) -> dict[str, int]:
        for name in v:  # each becomes <name>.parquet in the data stage's output, and <name>.jsonl is read
            if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
                raise FieldError(f"split name {name!r}: {SAFE_NAME_FIX} (it becomes a file name: {name}.parquet)", name)
        missing = {"train", "test"} - set(v)
        if missing:
            raise ValueError(f"add the split(s) {sorted(missing)}: students train on 'train', evaluation uses 'test'")
        bad = {k: n for k, n in v.items() if not isinstance(n, int) or not 1 <= n <= MAX_ROWS}
        if bad:
            raise ValueError(f"split sizes must be integers from 1 to {MAX_ROWS:,}, got {bad}")
        return v

    @model_validator(mode="after")
    def _path_for_files(self):
        if self.source is DataSource.gsm8k and not self.path:
            raise ValueError(
                "source 'gsm8k' reads local files: set data.path to the folder holding train.jsonl/test.jsonl"
            )
        if self.source is DataSource.instructions:
            self._instruction_files()
        else:
            for field in ("transfer", "test"):
                if getattr(self, field) is not None:
                    raise FieldError(
                        f"{field} is a file of source 'instructions'; source {self.source.value!r} does "
                        "not read it: remove it",
                        field,
                    )
        if self.source is not DataSource.arithmetic and self.solution_order is not SolutionOrder.fixed:
            raise FieldError(
                f"source {self.source.value!r} has its own rationales; solution_order is for the "
                "arithmetic generator: remove it",
                "solution_order",
            )
        return self

    def _instruction_files(self) -> None:
        if self.path is not None:
            raise FieldError(
                "source 'instructions' reads two files, not a folder: remove data.path and set "
                "data.transfer and data.test",
                "path",
            )
        for field, example in (
            ("transfer", "data/t0-short/prompts.jsonl"),
            ("test", "data/self-instruct/user_oriented_instructions.jsonl"),
        ):
            if getattr(self, field) is None:
                raise FieldError(f"source 'instructions' needs data.{field}: set it to a file such as {example}", field)
            if not self.location(field).is_file():
                raise FieldError(
                    f"no file at {self.location(field)}: point data.{field} at an existing file, e.g. "
                    f"{example} ({PATH_RULE})",
                    field,
                )

    def location(self, field: str) -> Path:
        """Where the file (or folder) that ``field`` names is read from: as written when absolute, else in the
        project."""
        path = Path(getattr(self, field))
        return path if path.is_absolute() else ROOT / path
