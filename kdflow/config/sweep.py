"""The sweep recipe (``flows/kd_sweep.py``): one distillation recipe's student, trained on shares of the teacher's
kept answers, once per KD method and seed. ``kdflow/reporting/sweep.py`` summarises what it trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from kdflow.config.fields import PATH_RULE, ROOT, SAFE_NAME, SAFE_NAME_FIX, RecipePath, SafeName, Strict, recipe_context
from kdflow.config.kd import KD_METHODS, KDSection
from kdflow.config.loading import FieldError, RecipeError, _line_of, parse_yaml, read_recipe_file
from kdflow.config.precision import check_precision
from kdflow.config.recipe import load_recipe
from kdflow.config.run import Seeds
from kdflow.config.student import StudentData
from kdflow.config.training import check_sft_config


class SweepRecipe(Strict):
    recipe: RecipePath = Field(
        description="the distillation recipe whose run (data, teacher, answers, logit cache) "
        "is used (a relative path: see fields.PATH_RULE)"
    )
    student: SafeName = Field(
        description="the recipe student (data: teacher) whose architecture and training are swept"
    )
    fractions: list[float] = Field(min_length=1, description="shares of the kept teacher answers, each in (0, 1]")
    # as run.seeds: [0, 0] named two students alike, [-1] failed in numpy
    seeds: Seeds = Field(min_length=1, description=">= 3 for a mean and a spread worth reading")
    methods: dict[str, KDSection | None] = Field(min_length=2, description="name -> kd section; null = seq-KD (SFT)")
    training: dict[str, Any] = Field(default_factory=dict, description="overrides of the student's training keys")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < f <= 1.0 for f in v):
            raise ValueError(f"each fraction must be in (0, 1], got {v}")
        return sorted(set(v))

    @field_validator("training")
    @classmethod
    def _training(cls, v: dict[str, Any]) -> dict[str, Any]:
        # as a recipe student's `training:`: merged with model_copy, these reached torch unchecked (a negative
        # learning rate failed in the first student's optimizer, naming no sweep field)
        return check_sft_config(v)

    @field_validator("methods")
    @classmethod
    def _method_names(cls, v: dict) -> dict:
        # each becomes a student name, `<method>-<fraction>@<seed>` (parse_name splits it again)
        for name in v:
            if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
                raise FieldError(f"method name {name!r}: {SAFE_NAME_FIX} (it names the students trained with it)", name)
        return v

    @model_validator(mode="after")
    def _one_sft(self):
        if not any(kd is None for kd in self.methods.values()):
            raise ValueError("methods needs one seq-KD entry (`name: null`) for the others to be compared with")
        return self

    def recipe_path(self) -> Path:
        p = Path(self.recipe)
        return p if p.is_absolute() else ROOT / p

    def students(self):
        """Every student to train: ``<method>-<fraction>@<seed>``, the recipe student's copy for each."""
        r = load_recipe(self.recipe_path())
        if r.teacher.imported:
            # flows/kd_sweep.py reads the teacher's evaluation; a teacher known only by its imported logits has none,
            # so the sweep loaded and failed after training every arm
            line = _line_of(yaml.compose(self.recipe_path().read_text()), ("teacher", "imported"))
            raise RecipeError(
                f"{self.recipe_path()}:{line}: teacher.imported: the sweep measures each arm against the teacher's "
                "accuracy, and a teacher known only by its imported logit dataset is never evaluated, so it has none: "
                "name the teacher's model in teacher.model (it is then loaded and evaluated), or sweep another recipe"
            )
        base = next((s for s in r.students if s.name == self.student), None)
        if base is None:
            raise RecipeError(
                f"{self.recipe}: no student named {self.student!r}; students: {[s.name for s in r.students]}"
            )
        if base.data is not StudentData.teacher:
            raise RecipeError(f"sweep.student: {self.student!r} learns from gold data; pick a `data: teacher` student")
        training = {**base.training, **self.training}
        try:  # each part passed on its own; together (TRL's cross-field checks, the student's dtype) they must too
            check_sft_config(training)
            check_precision(base.dtype, training)
        except ValueError as e:
            key = f".{e.loc[0]}" if isinstance(e, FieldError) and e.loc else ""
            raise RecipeError(
                f"sweep training{key}: with student {self.student!r}'s own training in {self.recipe}: {e}; change "
                "the sweep's override or the student's setting"
            ) from None
        return [
            base.model_copy(
                update={
                    "name": f"{method}-{fraction:g}@{seed}",
                    "kd": kd,
                    "seed": seed,
                    "data_fraction": fraction,
                    "training": training,
                }
            )
            for fraction in self.fractions
            for method, kd in self.methods.items()
            for seed in self.seeds
        ]


def load_sweep(path: str | Path) -> SweepRecipe:
    path = Path(path)
    sweep = parse_yaml(
        SweepRecipe,
        read_recipe_file(path, "sweep"),
        str(path),
        "a sweep is a YAML mapping with recipe, student, fractions, seeds, methods",
        kind="sweep",
        skip=KD_METHODS,
        context=recipe_context(path.parent),
    )
    if not sweep.recipe_path().is_file():
        raise RecipeError(
            f"{path}: recipe: no file {sweep.recipe_path()} ({PATH_RULE}); point it at a distillation recipe"
        )
    sweep.students()  # a bad recipe, student or merged training fails here too, before any work
    return sweep
