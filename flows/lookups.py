"""What a stage flow rerun alone takes from an existing run folder: each output the recipe's settings key, found by
that key (``found``), never merely the newest of its stage — after an edit and its revert, the newest is the edited
recipe's. Each lookup mirrors the chain that makes the output (flows/chain.py, flows/train_teacher.py): the teacher
(``run_teacher``), several teachers (``run_teachers``), the upstream outputs (``found_upstream``), the preflight
(``run_preflights``) and the students (``trained_students``). Nothing here builds an output.
"""

from __future__ import annotations

from pathlib import Path

from flows.chain import Upstream, answering_teachers
from flows.train_teacher import as_teacher
from kdflow.config.logit_import import reader_start
from kdflow.config.recipe import Recipe, load_recipe
from kdflow.config.student import StudentInit, StudentSection
from kdflow.models.gguf import is_gguf_path
from kdflow.store import run_folder
from kdflow.store.model_folders import model_location
from kdflow.store.outputs import OutputRef, output_dir
from kdflow.store.stage import Stage
from kdflow.teacher.routing import RoutedTeachers
from kdflow.training.student import cache_stage, needs_routed_teachers, student_inputs
from tasks.capture import CAPTURE, JOIN_CACHES
from tasks.curate import CURATE
from tasks.data import DATA
from tasks.generate import GENERATE, JOIN_ANSWERS
from tasks.import_logits import IMPORT as IMPORT_LOGITS
from tasks.models import IMPORT_GGUF
from tasks.preflight import PREFLIGHT, preflight_args
from tasks.students import STUDENTS
from tasks.teacher import API_TEACHER, EXISTING_TEACHER, IMPORTED_TEACHER, TEACHER


def recipe_and_run(recipe: str, run_dir: str | None) -> tuple[Recipe, Path]:
    """A stage flow rerun alone: the recipe, and the run folder to take inputs from and write to (the recipe's
    unless ``run_dir`` names another)."""
    r = load_recipe(recipe)  # a bad recipe fails here, before any work
    return r, Path(run_dir) if run_dir else r.run_dir


def run_teacher(run: Path, r: Recipe, data: OutputRef | None = None) -> OutputRef:
    """A run's finished teacher, for a stage rerun alone: the output ``teacher_chain`` keys for this recipe (with
    several teachers, the default one), not the newest teacher in the folder. ``data``: the recipe's data output,
    found here when not given (a trained or API teacher is keyed by it)."""
    if r.teachers:
        return run_teachers(run, r, data)[r.routing.default]
    return _found_teacher(run, r, data, None)


def run_teachers(run: Path, r: Recipe, data: OutputRef | None = None) -> dict[str, OutputRef]:
    """Each of the recipe's several teachers, by name, as ``named_teachers`` keys it (found, not made)."""
    return {t.name: _found_teacher(run, as_teacher(r, t), data, t.train_on) for t in r.teachers}


def _found_teacher(run: Path, r: Recipe, data: OutputRef | None, train_on) -> OutputRef:
    """``teacher_chain``'s output for ``r``, looked up: each branch keys its stage as that function's task does."""
    t, make = r.teacher, "`kdflow teacher <recipe>`"
    if t.imported:
        return found(run, IMPORTED_TEACHER, make, section=t)
    if is_gguf_path(t.model):
        return found(run, IMPORT_GGUF, make, f"import of the teacher {t.model}", gguf=t.model, dtype=t.dtype)
    if t.model:
        return found(run, EXISTING_TEACHER, make, section=t)
    data = data if data is not None else found(run, DATA, section=r.data)
    cot = r.prompts.cot_text()
    if t.api:
        return found(run, API_TEACHER, make, section=t, api=r.generation.api, data=data, template=cot)
    return found(run, TEACHER, make, section=t, data=data, template=cot, train_on=train_on)


def found(run: Path, stage: Stage, make: str | None = None, what: str | None = None, **inputs) -> OutputRef:
    """For a stage rerun alone: the output of ``stage`` that ``inputs`` (the recipe's settings and the upstream outputs
    found before it) key, not merely the newest in the folder: after an edit and its revert the newest is the edited
    recipe's, which a report would then show as this recipe's. ``make``: the command that makes it (default: "the stage
    that makes it"); ``what``: what it is, for the error (default: the stage's output)."""
    output = stage.output(run, **inputs)
    there = output_dir(run, stage.name, output.key).is_dir()  # before .done, which sets a damaged one aside
    if done := output.done:
        return done
    others = run_folder.outputs(run, stage.name)
    if there:  # the recipe's own output was there but damaged (the warning before this says how): removed
        why = f" (its output {output.key[:16]} was damaged and has been removed: the log's warning says how)"
    else:
        why = (
            f" ({len(others)} of other settings: the recipe was edited since they were made, or a kdflow upgrade "
            "changed how this stage is keyed)"
            if others
            else ""
        )
    raise run_folder.MissingStage(
        f"no finished {what or repr(stage.name) + ' output'} of this recipe's settings in {run}{why}"
        f": run {make or 'the stage that makes it'}, or the whole flow (kdflow distill <recipe>), first"
    )


def found_upstream(run: Path, r: Recipe, teacher: OutputRef, curated: bool, logits: bool) -> Upstream:
    """``upstream`` from the run folder, each output the one the recipe keys (``found``): the data, and where asked
    the curated answers and the logit cache (captured, imported or several teachers' joined). ``teacher``: the
    recipe's (``run_teacher``); with several teachers each is found by its own key and the result holds them all."""
    data = found(run, DATA, section=r.data)
    cot = r.prompts.cot_text()
    teachers = run_teachers(run, r, data) if r.teachers else None
    answers = kept = cache = None
    if r.teachers:
        if curated or logits:
            answers = found_answers(run, r, teacher, data, teachers)
            kept = found(run, CURATE, section=r.filters, source=r.data.source, answers=answers, teacher=teacher)
        if logits and r.logit_cache is not None:
            caches = {
                t.name: found(
                    run,
                    CAPTURE,
                    section=r.logit_cache,
                    template=cot,
                    teacher=teachers[t.name],
                    curated=kept,
                    routed_to=t.name,
                )
                for t in answering_teachers(r)
            }
            cache = found(run, JOIN_CACHES, parts=caches)
    else:
        imported = r.logit_cache is not None and r.logit_cache.imported
        if curated or (logits and not imported):
            answers = found_answers(run, r, teacher, data)
            kept = found(run, CURATE, section=r.filters, source=r.data.source, answers=answers, teacher=teacher)
        if logits and imported:
            cache = found(run, IMPORT_LOGITS, section=r.logit_cache, tokenizer=_import_tokenizer(run, r, teacher))
        elif logits and r.logit_cache is not None:
            cache = found(run, CAPTURE, section=r.logit_cache, template=cot, teacher=teacher, curated=kept)
    if logits and r.logit_cache is None:  # a recipe without a logit_cache section has none of its own
        cache = run_folder.latest(run, cache_stage(r))  # the newest, or MissingStage
    return Upstream(data, teacher, answers, kept if curated else None, cache, teachers)


def found_answers(
    run: Path, r: Recipe, teacher: OutputRef, data: OutputRef, teachers: dict[str, OutputRef] | None = None
) -> OutputRef:
    """The teacher's answers the recipe keys; with several teachers, their joined answers (each part by its teacher's
    key and routing). ``teachers``: several teachers' outputs by name, found here when not given."""
    cot = r.prompts.cot_text()
    if not r.teachers:
        return found(run, GENERATE, section=r.generation, template=cot, teacher=teacher, data=data)
    teachers = teachers if teachers is not None else run_teachers(run, r, data)
    parts = {
        t.name: found(
            run,
            GENERATE,
            section=t.generation or r.generation,
            template=cot,
            teacher=teachers[t.name],
            data=data,
            routing=r.routing,
            routed_to=t.name,
        )
        for t in answering_teachers(r)
    }
    return found(run, JOIN_ANSWERS, parts=parts)


def one_teacher(r: Recipe, command: str) -> None:
    """A stage that runs one teacher (the sharded generation and capture) refuses a recipe of several, before any
    work: running the default teacher alone would answer or score rows routed to another."""
    if r.teachers:
        raise ValueError(
            f"`kdflow {command}` runs one teacher, and {r.run.name!r} routes rows to {len(r.teachers)} teachers "
            f"({', '.join(t.name for t in r.teachers)}): run `kdflow distill <recipe>` (or the stage without sharding)"
        )


def _import_tokenizer(run: Path, r: Recipe, teacher: OutputRef) -> str:
    """The tokenizer an imported logit cache was made for, as ``imported_upstream`` names it: the reading student's
    own model (a GGUF file: its import's folder), else the teacher's."""
    start = reader_start(r)
    owner = start.model if start is not None else None
    if is_gguf_path(owner):
        owner = model_location(found(run, IMPORT_GGUF, gguf=owner, dtype=start.dtype))
    return str(owner or model_location(teacher))


def run_preflights(run: Path, r: Recipe, up: Upstream) -> dict[str, OutputRef]:
    """The preflight ``upstream`` ran on each teacher that answers ("teacher" for the only one), by the key it ran
    under, where the run folder holds it: a run made by stage flows alone, or a recipe whose teacher answers nothing
    (an imported cache), has none."""
    if r.teachers:
        asked = {t.name: (as_teacher(r, t), up.teachers[t.name]) for t in answering_teachers(r)}
    else:
        asked = {"teacher": (r, up.teacher)}
    checked = {name: PREFLIGHT.output(run, **preflight_args(rt, t, up.data)).done for name, (rt, t) in asked.items()}
    return {name: ref for name, ref in checked.items() if ref is not None}


def trained_students(
    run: Path, students: list[StudentSection], template: str, up: Upstream, routed: RoutedTeachers | None = None
) -> dict[str, OutputRef]:
    """What ``train_in_order`` made of ``students`` (as ``starting_points`` returns them), found in the run folder
    under the keys the recipe gives them: a student whose settings were edited since it was trained is missing, not
    replaced by the edited one's model. ``routed``: several teachers (``Upstream.routed``), in the key of the
    on-policy students they score, as ``train_in_order`` hands them."""
    trained: dict[str, OutputRef] = {}
    for s in students:
        if isinstance(s.init, StudentInit):
            s = s.model_copy(update={"model": model_location(trained[s.init.student]), "init": None})
        curated, logits = student_inputs(s, up.curated, up.logits)
        inputs = dict(section=s, template=template, teacher=up.teacher, data=up.data, curated=curated, logits=logits)
        scorers = routed if needs_routed_teachers(s) else None
        trained[s.name] = found(run, STUDENTS, what=f"student {s.name!r}", **inputs, routed=scorers)
    return trained
