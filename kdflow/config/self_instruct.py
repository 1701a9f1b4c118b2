"""The self-instruct recipe: seed instructions, a teacher, how it writes new instructions and answers them,
and the filters its answers go through. Same conventions as ``kdflow.config.recipe`` (typed, extra="forbid", errors
as ``file:line: field: fix``); the teacher, generation and filters sections are the distill recipe's own."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from kdflow.config.fields import ROOT, RecipePath, Strict, Template, recipe_context
from kdflow.config.filters import FiltersSection
from kdflow.config.generation import GenerationSection
from kdflow.config.loading import parse_yaml, read_recipe_file
from kdflow.config.run import RunSection
from kdflow.config.teacher import TeacherSection

WRITE_SPLIT, ANSWER_SPLIT = "expand", "instructions"


class SeedsSection(Strict):
    path: RecipePath = Field(
        description="JSONL / parquet / saved HF dataset of seed instructions (a relative path: see fields.PATH_RULE)"
    )
    field: str = Field("instruction", description="the column holding the instruction text")

    def location(self) -> Path:
        return Path(self.path) if Path(self.path).is_absolute() else ROOT / self.path


class ExpansionSection(Strict):
    template: Template = Field("prompts/self_instruct.jinja")
    prompts: int = Field(20, ge=1, description="expansion prompts the teacher answers")
    seeds_per_prompt: int = Field(3, ge=1, description="seed instructions shown in each prompt")
    new_per_prompt: int = Field(5, ge=1, description="new instructions asked for in each prompt")
    seed: int = 0
    min_words: int = Field(3, ge=1)
    max_words: int = Field(80, ge=1)
    threshold: float = Field(
        0.7, gt=0.0, le=1.0, description="MinHash Jaccard (word n-grams) that counts as a near copy"
    )
    ngram: int = Field(2, ge=1, description="instructions are short: word pairs, not the answers' triples")

    def template_text(self) -> str:
        return (ROOT / self.template).read_text()


class SelfInstructRecipe(Strict):
    run: RunSection
    seeds: SeedsSection
    teacher: TeacherSection
    expansion: ExpansionSection = ExpansionSection()
    writing: GenerationSection = Field(description=f"how the teacher writes instructions; splits: [{WRITE_SPLIT}]")
    answering: GenerationSection = Field(description=f"how the teacher answers them; splits: [{ANSWER_SPLIT}]")
    filters: FiltersSection = FiltersSection()

    @model_validator(mode="after")
    def _checks(self):
        if self.teacher.model is None:
            raise ValueError("self-instruct needs an existing teacher: set teacher.model (a folder or hub id)")
        for name, section, split in (
            ("writing", self.writing, WRITE_SPLIT),
            ("answering", self.answering, ANSWER_SPLIT),
        ):
            if section.splits != [split]:
                raise ValueError(f"{name}.splits must be [{split}] (the stage's own split), got {section.splits}")
        return self

    @property
    def run_dir(self) -> Path:
        return self.run.local_dir(ROOT)  # a URL root: a local staging folder bound to it (kdflow/store/remote.py)


def load_self_instruct_recipe(path: str | Path) -> SelfInstructRecipe:
    path = Path(path)
    return parse_yaml(
        SelfInstructRecipe,
        read_recipe_file(path),
        str(path),
        "a self-instruct recipe is a YAML mapping with sections run, seeds, teacher, ...",
        context=recipe_context(path.parent),
    )
