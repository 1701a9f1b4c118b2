"""The learning-curve study recipe (``flows/learning_curves.py``): students of one distillation recipe (and any
added arms), each trained once per seed with ``curve_points`` snapshots, compared by the evaluate stage's quality figure
(accuracy, or ROUGE-L on instruction data) against student steps and training wall time (kdflow/reporting/curves.py).

An arm may start from another arm's snapshot (``warm_starts``: e.g. on-policy KD after a short seq-KD warm start):
it is trained from that snapshot's weights, and its curve is drawn from the warm start's step and time on, so its
steps and seconds count the warm start's too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from kdflow.config.fields import PATH_RULE, ROOT, RecipePath, SafeName, Strict, recipe_context
from kdflow.config.kd import KD_METHODS
from kdflow.config.loading import RecipeError, parse_yaml, read_recipe_file
from kdflow.config.recipe import Recipe, load_recipe, seeded
from kdflow.config.student import StudentInit, StudentSection
from kdflow.config.training import check_sft_config


class WarmStart(Strict):
    student: SafeName = Field(description="the arm whose snapshot this arm starts from (e.g. seq-kd)")
    step: int = Field(ge=1, description="that arm's snapshot step: one of its curve steps")


class StudyRecipe(Strict):
    recipe: RecipePath = Field(
        description="the distillation recipe whose run (data, teacher, answers, logit cache) "
        "is used (a relative path: see fields.PATH_RULE)"
    )
    students: list[SafeName] = Field(default_factory=list, description="the recipe's students to compare, by name")
    add: list[StudentSection] = Field(default_factory=list, description="more arms, as full student sections")
    seeds: list[int] = Field(min_length=1, description=">= 3 for a mean and a spread worth reading")
    curve_points: int = Field(5, ge=2, le=100, description="snapshots per student, evenly spaced, the last at the end")
    reference: SafeName = Field("seq-kd", description="the arm the others are compared with")
    warm_starts: dict[SafeName, WarmStart] = Field(
        default_factory=dict, description="arm -> the snapshot it starts from (the arm is trained from those weights)"
    )
    training: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the training keys of the recipe's students (an added arm has its own, whole)",
    )

    @model_validator(mode="after")
    def _arms(self):
        names = [*self.students, *(s.name for s in self.add)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arm names must be unique; rename {dup} (in students or add)")
        if not names:
            raise ValueError("name the recipe's students to compare (students: [baseline, seq-kd, ...]) or add arms")
        if self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not an arm: pick one of {names}")
        for arm, warm in self.warm_starts.items():
            if arm not in names or warm.student not in names:
                raise ValueError(f"warm_starts.{arm}: both {arm!r} and {warm.student!r} must be arms ({names})")
            if warm.student in self.warm_starts:
                raise ValueError(f"warm_starts.{arm}: {warm.student!r} is warm-started itself; start from a cold arm")
        check_sft_config(self.training)
        return self

    def recipe_path(self) -> Path:
        p = Path(self.recipe)
        return p if p.is_absolute() else ROOT / p

    def arms(self, recipe: Recipe) -> list[StudentSection]:
        """The arms as student sections (the recipe's, then the added ones), warm-started ones last."""
        by_name = {s.name: s for s in recipe.students}
        missing = [n for n in self.students if n not in by_name]
        if missing:
            raise RecipeError(f"{self.recipe}: no student named {missing}; students: {list(by_name)}")
        arms = sorted([by_name[n] for n in self.students] + list(self.add), key=lambda s: s.name in self.warm_starts)
        for i, arm in enumerate(arms):  # the run it starts from is trained first, at the same seed
            if isinstance(arm.init, StudentInit) and arm.init.student not in {a.name for a in arms[:i]}:
                raise RecipeError(
                    f"{self.recipe}: student {arm.name!r} starts from student {arm.init.student!r} (init: from: "
                    f"student); add {arm.init.student!r} to the study's students, before {arm.name!r}"
                )
        return arms

    def training_of(self, arm: StudentSection) -> dict[str, Any]:
        """An arm's training keys: a recipe student's with the study's overrides, an added arm's as written."""
        return arm.training if arm.name not in self.students else {**arm.training, **self.training}

    def runs(self, recipe: Recipe) -> list[StudentSection]:
        """Every student to train: ``<arm>@<seed>`` with the study's snapshots and training overrides."""
        return [
            arm.model_copy(
                update={
                    "name": f"{arm.name}@{seed}",
                    "seed": seed,
                    "init": seeded(arm.init, seed),  # from another arm: that arm's run at the same seed
                    "curve_points": self.curve_points,
                    "training": self.training_of(arm),
                }
            )
            for arm in self.arms(recipe)
            for seed in self.seeds
        ]


def load_study(path: str | Path) -> StudyRecipe:
    path = Path(path)
    study = parse_yaml(
        StudyRecipe,
        read_recipe_file(path, "study"),
        str(path),
        "a study is a YAML mapping with recipe, students, seeds, curve_points",
        kind="study",
        skip=KD_METHODS,
        context=recipe_context(path.parent),
    )
    if not study.recipe_path().is_file():
        raise RecipeError(
            f"{path}: recipe: no file {study.recipe_path()} ({PATH_RULE}); point it at a distillation recipe"
        )
    study.arms(load_recipe(study.recipe_path()))  # a bad recipe or an unknown student fails here, before any work
    return study
