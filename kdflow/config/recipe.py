"""Recipes: one YAML per experiment, parsed into typed sections.

A bad recipe fails before any work with ``RecipeError``, naming the file, the field (and its line) and
the fix. Training knobs pass straight through to TRL's ``SFTConfig`` so that TRL validates them itself.
Fields listed in a section's ``__throughput_fields__`` (batch sizes for generation and evaluation) change
how fast a stage runs, not what it produces, so they are left out of cache keys.

Each section lives in a module of its own beside this one (run, data, generation, filters, teacher, student, kd,
evaluation, logit_cache, cost); this one holds the whole recipe, the checks across its sections, and its loader.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from kdflow.config.cost import CostSection
from kdflow.config.data import DataSection, DataSource
from kdflow.config.evaluation import EvaluationSection
from kdflow.config.fields import ROOT, Strict, recipe_context
from kdflow.config.filters import FiltersSection
from kdflow.config.generation import Backend, GenerationSection, PromptsSection
from kdflow.config.kd import KD_METHODS, OfflineKD, OnPolicyKD
from kdflow.config.loading import FieldError, parse_yaml, read_recipe_file
from kdflow.config.logit_cache import LogitCacheSection
from kdflow.config.logit_import import check_import
from kdflow.config.run import RunSection, check_seeds
from kdflow.config.student import PrunedInit, StudentData, StudentInit, StudentSection
from kdflow.config.teacher import TeacherSection
from kdflow.config.teachers import NamedTeacher, Routing, check_routed, fill_teachers


class Recipe(Strict):
    run: RunSection
    data: DataSection
    prompts: PromptsSection = PromptsSection()
    teacher: TeacherSection
    generation: GenerationSection
    filters: FiltersSection = FiltersSection()
    students: list[StudentSection] = Field(min_length=1)
    evaluation: EvaluationSection = EvaluationSection()
    logit_cache: LogitCacheSection | None = None
    cost: CostSection | None = None  # the report's prices only: given to no stage, so in no stage's key
    # Several teachers, each row answered by the one `routing` names (kdflow/config/teachers.py); `teacher` is then
    # the default one, filled in before validation.
    teachers: list[NamedTeacher] | None = None
    routing: Routing | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_teacher(cls, data):
        return fill_teachers(data)

    @model_validator(mode="after")
    def _cross_checks(self):
        names = [s.name for s in self.students]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"students.name must be unique; rename {dup}")
        for split in [*self.generation.splits, self.evaluation.split]:
            if split not in self.data.splits:
                raise ValueError(f"split {split!r} is not in data.splits {sorted(self.data.splits)}: add it there")
        if self.evaluation.split in self.generation.splits:
            raise ValueError(
                f"generation.splits includes the evaluation split {self.evaluation.split!r}: "
                "students would train on test questions; remove it"
            )
        for s in self.students:
            if s.kd is None:
                continue
            if s.data is not StudentData.teacher:
                raise ValueError(f"student {s.name!r}: kd distils the teacher on its own answers; set data: teacher")
            if isinstance(s.kd, OfflineKD) and self.logit_cache is None:
                raise ValueError(
                    f"student {s.name!r}: kd method offline trains from the logit cache; add a "
                    "`logit_cache:` section (e.g. `logit_cache: {k: 20}`)"
                )
            if isinstance(s.kd, OnPolicyKD) and s.kd.lmbda < 1.0 and self.logit_cache is None:
                raise ValueError(
                    f"student {s.name!r}: kd method on_policy with lmbda {s.kd.lmbda} < 1 trains a share "
                    "of its steps on the logit cache's rows; add a `logit_cache:` section, or set lmbda: 1"
                )
        if self.logit_cache is not None and self.logit_cache.imported:
            check_import(self)
        elif self.teacher.imported:
            raise FieldError(
                "teacher.imported: true means the teacher is only the logits of an imported dataset: add "
                "logit_cache: {import: {path: ..., format: distillkit | axolotl}}, or name the teacher (model, "
                "architecture or api)",
                "teacher",
                "imported",
            )
        check_routed(self)
        if self.teacher.api and self.teachers is None:  # each of several teachers has its own generation section
            self._api_teacher_checks()
        if self.data.source is DataSource.instructions:
            self._free_text_checks()
        self._pruning_checks()
        self._top_k_check()
        if self.run.seeds and (own := own_seeds(self.students)):
            i, name = own[0]
            raise FieldError(f"{SEEDS_REPLACE.format(name=name)}, or remove run.seeds", "students", i, "seed")
        return self

    def _top_k_check(self) -> None:
        """A top-k wider than the teacher's vocabulary cannot be captured: said here, not at the capture stage after
        the teacher has answered."""
        if self.logit_cache is None or self.logit_cache.imported or self.teacher.api:
            return  # an imported cache's k is the file's
        vocab = self.teacher.vocab()
        if vocab is not None and self.logit_cache.k > vocab:
            raise FieldError(
                f"{self.logit_cache.k} ids per position are more than the teacher's vocabulary of {vocab} tokens; "
                f"keep between 1 and {vocab}",
                "logit_cache",
                "k",
            )

    def _pruning_checks(self) -> None:
        """A student pruned from the teacher keeps at most the teacher's layers and MLP channels (known here for a
        teacher folder, a GGUF file or an architecture to train), and needs the teacher's weights. A student started
        from another starts from one listed before it (the order students train in)."""
        for i, s in enumerate(self.students):
            if isinstance(s.init, StudentInit):
                before = [t.name for t in self.students[:i]]
                if s.init.student not in before:
                    later = (
                        "is the student itself"
                        if s.init.student == s.name
                        else "is listed after it"
                        if s.init.student in {t.name for t in self.students}
                        else "is not a student of the recipe"
                    )
                    raise FieldError(
                        f"student {s.name!r}: init.student {s.init.student!r} {later}; name a student "
                        f"listed before {s.name!r} ({', '.join(before) or 'none is'}), which it starts from "
                        "once trained",
                        "students",
                        i,
                        "init",
                        "student",
                    )
                continue
            if s.init is None:
                continue
            if self.teacher.api:
                raise FieldError(
                    f"student {s.name!r}: init from the teacher prunes its layers, and an API teacher's "
                    "weights are not here; use model: or architecture:",
                    "students",
                    i,
                    "init",
                )
            n = self.teacher.layer_count()
            if n is not None and s.init.layers > n:
                raise FieldError(
                    f"student {s.name!r}: init.layers {s.init.layers} is more than the teacher's {n} "
                    f"layers; keep between 1 and {n}",
                    "students",
                    i,
                    "init",
                    "layers",
                )
            width = self.teacher.mlp_width() if s.init.mlp_width is not None else None
            if width is not None and s.init.mlp_width > width:
                raise FieldError(
                    f"student {s.name!r}: init.mlp_width {s.init.mlp_width} is more than the teacher's {width} "
                    f"MLP channels per layer (its intermediate_size); keep between 1 and {width}",
                    "students",
                    i,
                    "init",
                    "mlp_width",
                )

    def _free_text_checks(self) -> None:
        """Instruction data has reference answers, not answers a checker can verify: what needs a checker is refused."""
        why = "data.source 'instructions' is free text, with no answer checker"
        if self.filters.correctness:
            raise FieldError(
                f"{why}: set filters.correctness: false (the filters for free text stay: empty, truncated, "
                "length, patterns, dedup, judge)",
                "filters",
                "correctness",
            )
        if self.filters.self_consistency is not None:
            raise FieldError(
                f"{why}; self-consistency votes on final answers: remove filters.self_consistency",
                "filters",
                "self_consistency",
            )
        if self.evaluation.pass_at_k is not None:
            raise FieldError(
                f"{why}; pass@k counts correct samples: remove evaluation.pass_at_k (quality is ROUGE-L "
                "against the reference)",
                "evaluation",
                "pass_at_k",
            )

    def _api_teacher_checks(self) -> None:
        """An API teacher is only the answers the API returns: what needs its weights is refused here, with why."""
        g, why = self.generation, "teacher.api: true: the API model is the teacher and its weights are not available"
        if g.backend is not Backend.openai:
            raise FieldError(
                "teacher.api: true asks the model generation.api names; set generation.backend: openai with "
                "api.base_url and api.model",
                "generation",
                "backend",
            )
        if not g.api.model:
            raise FieldError(
                "teacher.api: true: name the API's model (the teacher) in generation.api.model", "generation", "api"
            )
        if self.logit_cache is not None:
            raise FieldError(
                f"{why}; the logit cache needs its forward pass (source hf/vllm) or, for source api, its "
                "tokenizer (the students' is trained here); remove logit_cache",
                "logit_cache",
            )
        for i, s in enumerate(self.students):
            if s.kd is not None:
                raise FieldError(
                    f"student {s.name!r}: {why}; kd ({s.kd.method.value}) needs its logits or hidden "
                    "states; remove kd (the student learns from the API's answers: data: teacher)",
                    "students",
                    i,
                    "kd",
                )
        if self.filters.judge is not None:
            raise FieldError(
                f"{why}; the judge filter runs the teacher locally; remove filters.judge", "filters", "judge"
            )

    def with_seeds(self, seeds: list[int]) -> Recipe:
        """This recipe with ``run.seeds`` replaced (the run folder and every cached stage stay the same)."""
        try:
            checked = check_seeds([s if isinstance(s, bool) else int(s) for s in seeds])  # True is no seed
        except ValueError as e:
            raise ValueError(f"--seeds: {e}") from None
        if own := own_seeds(self.students):
            raise ValueError(f"--seeds: {SEEDS_REPLACE.format(name=own[0][1])}, or leave out --seeds")
        return self.model_copy(update={"run": self.run.model_copy(update={"seeds": checked})})

    def with_students(self, names: list[str]) -> Recipe:
        """This recipe with only the students named (as in the recipe, without a seed suffix), in the recipe's order:
        the run folder and every cached stage stay the same, so the others' outputs are kept, not retrained."""
        known = [s.name for s in self.students]
        if unknown := [n for n in names if n not in known]:
            raise ValueError(
                f"--students {' '.join(unknown)}: no such student in the recipe; its students are {', '.join(known)}"
            )
        wanted = set(names)
        for s in reversed(self.students):  # a student started from another needs that one (cached if trained)
            if s.name in wanted and isinstance(s.init, StudentInit):
                wanted.add(s.init.student)
        return self.model_copy(update={"students": [s for s in self.students if s.name in wanted]})

    def student_runs(self) -> list[StudentSection]:
        """The students to train: as listed, or each once per ``run.seeds`` seed, named ``<name>@<seed>``."""
        if not self.run.seeds:
            return list(self.students)
        return [
            s.model_copy(update={"name": f"{s.name}@{seed}", "seed": seed, "init": seeded(s.init, seed)})
            for s in self.students
            for seed in self.run.seeds
        ]

    @property
    def run_dir(self) -> Path:
        return self.run.local_dir(ROOT)


# The tenth audit (#31): run.seeds replaced a student's own `seed:` without a word.
SEEDS_REPLACE = (
    "student {name!r} sets its own seed, which run.seeds (--seeds) would replace: every student is trained once per "
    "seed as <name>@<seed>; remove the student's `seed:`"
)


def own_seeds(students: list[StudentSection]) -> list[tuple[int, str]]:
    """(index, name) of each student that sets ``seed`` itself."""
    return [(i, s.name) for i, s in enumerate(students) if "seed" in s.model_fields_set]


def seeded(init: PrunedInit | StudentInit | None, seed: int) -> PrunedInit | StudentInit | None:
    """A student's init under run.seeds: one started from another student starts from that student's same seed."""
    if isinstance(init, StudentInit):
        return init.model_copy(update={"student": f"{init.student}@{seed}"})
    return init


def parse_recipe(text: str, source: str = "<recipe>", folder: Path | None = None) -> Recipe:
    """``folder``: the recipe file's folder, where (besides the project folder) the templates it names may lie, and
    what its relative paths resolve against when it is outside the project (``fields.PATH_RULE``)."""
    return parse_yaml(
        Recipe,
        text,
        source,
        "a recipe is a YAML mapping with sections run, data, teacher, ...",
        context=recipe_context(folder),
        skip=KD_METHODS,
    )


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    return parse_recipe(read_recipe_file(path), source=str(path), folder=path.parent)
