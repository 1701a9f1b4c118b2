"""Recipes for classic KD of classifiers (``flows/distill_classifier.py``, ``flows/classifier_sweep.py``).

Same conventions as ``kdflow/config/recipe.py``: one YAML per experiment, typed sections with ``extra="forbid"``,
and a bad recipe fails before any work with ``RecipeError`` lines naming ``file:line: field: fix``.

Two model kinds, chosen per data source: plain torch MLPs on the bundled digits (``kind: mlp``, trained
by ``kdflow/classic/digits.py``'s loop, knobs typed here) and transformers sequence classifiers on the
generated reviews (``kind: transformer``, trained by a ``transformers.Trainer`` subclass, knobs passed
through to ``TrainingArguments``, which validates them).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from kdflow.config.fields import ROOT, Strict, recipe_context
from kdflow.config.loading import parse_yaml, read_recipe_file
from kdflow.config.run import RunSection
from kdflow.config.training import DEFAULTS, check_training_values


class ClassifierData(str, enum.Enum):
    digits = "digits"  # scikit-learn's bundled 8x8 handwritten digits (real data, no download)
    reviews = "reviews"  # a generated review-sentiment set (kdflow/classic/hf.py says exactly what it is)


class ClassifierDataSection(Strict):
    source: ClassifierData
    seed: int = Field(0, description="fixes the split (and, for reviews, the generated rows); not the training seed")
    test_fraction: float = Field(0.4, gt=0, lt=1)
    val_fraction: float = Field(0.15, gt=0, lt=1)
    rows: int | None = Field(None, ge=100, description="reviews only: how many rows to generate")

    @model_validator(mode="after")
    def _fractions(self):
        if self.test_fraction + self.val_fraction >= 0.9:
            raise ValueError(
                f"test_fraction + val_fraction = {self.test_fraction + self.val_fraction:.2f} leaves "
                "under 10% to train on; lower them"
            )
        if self.source is ClassifierData.reviews and self.rows is None:
            raise ValueError("source 'reviews' is generated: set data.rows (e.g. 3000)")
        if self.source is ClassifierData.digits and self.rows is not None:
            raise ValueError("source 'digits' has a fixed 1,797 images: remove data.rows")
        return self


class MLPTraining(Strict):
    epochs: int = Field(ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)


class MLP(Strict):
    kind: Literal["mlp"]
    hidden: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, description="hidden layer widths")
    dropout: float = Field(0.0, ge=0, lt=1)
    training: MLPTraining


# TrainingArguments keys kdflow sets itself (the seed comes from the recipe's `seeds`).
RESERVED_TRAINING_KEYS = {"output_dir", "seed", "use_cpu", "remove_unused_columns"}


class Transformer(Strict):
    kind: Literal["transformer"]
    hidden: int = Field(ge=8)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    intermediate: int = Field(ge=8)
    training: dict[str, Any] = Field(default_factory=dict, description="transformers.TrainingArguments keywords")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        return self

    @field_validator("training")
    @classmethod
    def _training(cls, v: dict[str, Any]) -> dict[str, Any]:
        from transformers import TrainingArguments

        reserved = RESERVED_TRAINING_KEYS & set(v)
        if reserved:
            raise ValueError(f"remove {sorted(reserved)}: kdflow sets them")
        check_training_values(v, TrainingArguments)
        try:
            training_arguments(v, "/tmp/kdflow-validate", seed=0)
        except TypeError as e:  # unknown keyword
            raise ValueError(f"{e}; see transformers.TrainingArguments for the accepted keys") from None
        except ValueError as e:
            raise ValueError(f"transformers rejected these settings: {e}") from None
        return v


Model = Annotated[MLP | Transformer, Field(discriminator="kind")]
MODEL_KINDS = frozenset({"mlp", "transformer"})  # the union's tags: not YAML keys, left out of error paths
KIND_FOR_SOURCE = {ClassifierData.digits: "mlp", ClassifierData.reviews: "transformer"}


class ClassifierTeacherSection(Strict):
    model: Model
    ensemble: int = Field(1, ge=1, description="members trained from different seeds; their predictions averaged")


class ClassifierStudentSection(Strict):
    model: Model


class DistillSection(Strict):
    """Hinton's loss: alpha · CE(hard labels) + (1 − alpha) · T² · KL(soft teacher ‖ soft student)."""

    temperature: float = Field(gt=0)
    alpha: float = Field(ge=0, lt=1, description="weight of the hard-label term (1 would ignore the teacher)")


class SweepSection(Strict):
    temperatures: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)
    alphas: list[Annotated[float, Field(ge=0, lt=1)]] = Field(min_length=1)
    ensemble_sizes: list[Annotated[int, Field(ge=1)]] = Field([1], min_length=1)


class OmittedClassSection(Strict):
    """Hinton et al. 2015, §3: the students' transfer set drops every example of one class (the teachers still
    train on all of them); the report then gives each student's accuracy on that class, as trained and with its
    bias raised by a value chosen on the validation split."""

    label: int = Field(ge=0, description="the class left out of the students' transfer set (a digit, 0-9)")


class ClassifierRecipe(Strict):
    run: RunSection
    data: ClassifierDataSection
    teacher: ClassifierTeacherSection
    student: ClassifierStudentSection
    distill: DistillSection
    seeds: list[int] = Field(min_length=1, description="one full experiment per seed; the report gives the spread")
    sweep: SweepSection | None = None
    omitted_class: OmittedClassSection | None = None

    @model_validator(mode="after")
    def _cross_checks(self):
        kind = KIND_FOR_SOURCE[self.data.source]
        for role, section in (("teacher", self.teacher), ("student", self.student)):
            if section.model.kind != kind:
                raise ValueError(
                    f"{role}.model.kind is {section.model.kind!r} but data.source "
                    f"{self.data.source.value!r} needs kind {kind!r}"
                )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if self.sweep and max(self.sweep.ensemble_sizes) > self.teacher.ensemble:
            raise ValueError(
                f"sweep.ensemble_sizes goes up to {max(self.sweep.ensemble_sizes)} but teacher.ensemble "
                f"is {self.teacher.ensemble}: raise teacher.ensemble or drop the larger sizes"
            )
        if self.omitted_class is not None:
            if self.data.source is not ClassifierData.digits:
                raise ValueError(
                    "omitted_class works on data.source 'digits' only (a two-class set without one "
                    "class leaves nothing to tell apart): remove the omitted_class section"
                )
            if self.omitted_class.label > 9:
                raise ValueError(f"omitted_class.label is {self.omitted_class.label} but the digits are 0-9")
        return self

    @property
    def run_dir(self) -> Path:
        return self.run.local_dir(ROOT)  # a URL root: a local staging folder bound to it (kdflow/store/remote.py)

    def member_seeds(self, seed: int) -> list[int]:
        """The ensemble members' training seeds for one experiment seed: distinct across members and seeds."""
        return [seed * 1000 + m for m in range(self.teacher.ensemble)]


def parse_classifier_recipe(text: str, source: str = "<recipe>", folder: Path | None = None) -> ClassifierRecipe:
    """``folder``: the recipe file's folder (``fields.PATH_RULE``)."""
    return parse_yaml(
        ClassifierRecipe,
        text,
        source,
        "a recipe is a YAML mapping with sections run, data, teacher, student, ...",
        skip=MODEL_KINDS,
        context=recipe_context(folder),
    )


def load_classifier_recipe(path: str | Path) -> ClassifierRecipe:
    return parse_classifier_recipe(read_recipe_file(path), source=str(path), folder=Path(path).parent)


def training_arguments(training: dict, output_dir: str, seed: int):
    """``TrainingArguments`` from a recipe's ``training`` keys (transformers validates them; built once when the
    recipe loads, and again by the trainer in kdflow/classic/hf.py).

    ``remove_unused_columns=False`` keeps the ``teacher_logits`` column, which the model's ``forward`` does
    not take; off a GPU the run is forced onto the CPU.
    """
    import torch
    from transformers import TrainingArguments

    cpu = {} if torch.cuda.is_available() else dict(use_cpu=True, bf16=False, fp16=False)
    return TrainingArguments(
        output_dir=output_dir, seed=seed, remove_unused_columns=False, **{**DEFAULTS, **training, **cpu}
    )
