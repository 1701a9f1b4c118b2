"""The two chains several flows share, written once.

``upstream``: data → teacher → the teacher's answers → curated answers → the logit cache (where the recipe has
one), every stage cached: what distill, the logit-cache flow and the sweep start from.
``evaluate_and_report``: every model evaluated (run names say which), the cost of all of them measured back to back,
lm-eval and the LLM judge where the recipe turns them on, then the report: what distill and the evaluate flow end with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flows.train_teacher import as_teacher, named_teachers, teacher_chain
from kdflow.config.data import DataSource
from kdflow.config.evaluation import EvaluationSection
from kdflow.config.generation import GenerationSection
from kdflow.config.logit_import import reader_start
from kdflow.config.recipe import Recipe
from kdflow.config.student import PrunedInit, StudentInit, StudentSection
from kdflow.models.gguf import is_gguf_path
from kdflow.store.model_folders import model_location
from kdflow.store.outputs import OutputRef
from kdflow.teacher import api_keys
from kdflow.teacher.routing import RoutedTeachers
from kdflow.training.student import (
    needs_curated,
    needs_routed_teachers,
    student_inputs,
    trains_on_imported_rows,
)
from tasks.capture import capture_logits, join_logit_caches
from tasks.curate import filter_answers
from tasks.data import make_data
from tasks.evaluate import evaluate_api_teacher, evaluate_model, judge_students, measure_deployment, run_lm_eval
from tasks.generate import generate_answers, join_answers
from tasks.import_logits import import_logits
from tasks.models import import_gguf_model, prune_teacher
from tasks.preflight import teacher_preflight
from tasks.quantize import quantize_students, quantized_name
from tasks.report import write_report
from tasks.students import train_student


def check_api_keys(generation: GenerationSection | None = None, judge: EvaluationSection.Judge | None = None) -> None:
    """Before any work: each API off this machine that the run will call (the teacher's, the judge's) has its key,
    in the environment variable or the Prefect Secret block the recipe names; else ``MissingApiKey`` naming it and
    the fix, instead of a 401 once the stage has started."""
    needs = api_keys.key_needs(generation, judge)
    api_keys.check_env_keys(needs)  # the variables; the Secret blocks need Prefect, so they are read here
    for n in needs:
        if n.secret_block:
            _check_secret_block(n)


def _check_secret_block(n: api_keys.KeyNeed) -> None:
    from prefect.blocks.system import Secret

    fix = (
        f"create it (`prefect block create secret`, or in Python Secret(value=<your key>).save({n.secret_block!r})) "
        f"on the Prefect server the flow runs against, or set {n.field}.api_key_secret_block: null and name an "
        f"environment variable in {n.field}.api_key_env (nothing was started)"
    )
    try:
        value = Secret.load(n.secret_block).get()
    except ValueError as e:
        raise api_keys.MissingApiKey(
            f"{n.field}.api_key_secret_block: no Prefect Secret block named {n.secret_block!r} ({e}): {fix}"
        ) from None
    if not str(value or "").strip():
        raise api_keys.MissingApiKey(
            f"{n.field}.api_key_secret_block: the Secret block {n.secret_block!r} is empty: {fix}"
        )


@dataclass
class Upstream:
    data: OutputRef
    teacher: OutputRef  # with several teachers, the default one
    answers: OutputRef | None  # None: no student learns from the teacher's answers (an imported logit cache)
    curated: OutputRef | None
    logits: OutputRef | None
    teachers: dict[str, OutputRef] | None = None  # several teachers, by name

    preflight: dict[str, OutputRef] | None = None  # each teacher's preflight, by name ("teacher" for the only one)

    def routed(self, r: Recipe) -> RoutedTeachers | None:
        """Several teachers and their routing, for the on-policy students they score (None with one teacher)."""
        return RoutedTeachers.of(r, self.teachers) if self.teachers else None


def upstream(r: Recipe, judge: EvaluationSection.Judge | None = None) -> Upstream:
    """``r``: the recipe, parsed once by the calling flow; ``judge``: the judge the caller runs afterwards, its key
    checked with the teacher's before any work."""
    check_api_keys(r.generation, judge)  # a missing key fails now, not as a 401 after the teacher has trained
    run_dir, cot = r.run_dir, r.prompts.cot_text()
    data = make_data(run_dir, r.data)
    if r.teachers:
        return routed_upstream(r, data)
    teacher = teacher_chain(r, data)
    if r.logit_cache and r.logit_cache.imported:  # another tool's logits: the teacher answers only if a student asks
        return imported_upstream(r, data, teacher)
    checked = teacher_preflight(r, teacher, data)  # a failed check stops the run here, before any spend
    answers = generate_answers(run_dir, r.generation, cot, teacher, data)
    curated = filter_answers(run_dir, r.filters, r.data.source, answers, teacher)
    logits = capture_logits(run_dir, r.logit_cache, cot, teacher, curated) if r.logit_cache else None  # KD from disk
    return Upstream(data, teacher, answers, curated, logits, preflight={"teacher": checked})


def imported_upstream(r: Recipe, data: OutputRef, teacher: OutputRef) -> Upstream:
    """``upstream`` of a recipe whose logit cache is imported (kdflow/config/logit_import.py): the import in place of
    the capture, made for the tokenizer of the students that read it; the preflight, the teacher's answers and their
    curation only where a student learns from those answers (seq-KD, online or feature KD beside the import)."""
    run_dir, cot = r.run_dir, r.prompts.cot_text()
    start = reader_start(r)
    owner = start.model if start is not None else None  # a student's own model; None: the teacher's tokenizer
    if is_gguf_path(owner):  # the same import (and key) as the student's start in starting_points
        owner = model_location(import_gguf_model(run_dir, owner, start.dtype))
    logits = import_logits(run_dir, r.logit_cache, owner or model_location(teacher))
    if not any(needs_curated(s) and not trains_on_imported_rows(s, logits) for s in r.students):
        return Upstream(data, teacher, None, None, logits, preflight={})
    checked = teacher_preflight(r, teacher, data)
    answers = generate_answers(run_dir, r.generation, cot, teacher, data)
    curated = filter_answers(run_dir, r.filters, r.data.source, answers, teacher)
    return Upstream(data, teacher, answers, curated, logits, preflight={"teacher": checked})


def answering_teachers(r: Recipe) -> list:
    """Of several teachers, those that answer rows: the default and each one a route sends rows to."""
    return [t for t in r.teachers if t.name == r.routing.default or t.name in r.routing.routes.values()]


def routed_answers(run_dir: Path, r: Recipe, teachers: dict[str, OutputRef], data: OutputRef) -> OutputRef:
    """Several teachers' answers: each answers the rows routed to it, the parts joined into one table (what the curate
    stage reads). ``teachers``: each by name (``named_teachers``, or ``run_teachers`` in a stage rerun alone)."""
    cot = r.prompts.cot_text()
    parts = {
        t.name: generate_answers.with_options(task_run_name=f"generate_answers[{t.name}]")(
            run_dir, t.generation or r.generation, cot, teachers[t.name], data, r.routing, t.name
        )
        for t in answering_teachers(r)
    }
    return join_answers(run_dir, parts)


def routed_upstream(r: Recipe, data: OutputRef) -> Upstream:
    """``upstream`` with several teachers: each answers the rows routed to it and captures its logits on the kept ones
    it answered; their answers and caches are joined by row into what the students read, as one teacher's would be."""
    run_dir, cot = r.run_dir, r.prompts.cot_text()
    teachers = named_teachers(r, data)
    routed = answering_teachers(r)
    checked = {  # each teacher that will answer, checked before any is asked (tasks/preflight.py)
        t.name: teacher_preflight(as_teacher(r, t), teachers[t.name], data, t.name) for t in routed
    }
    answers = routed_answers(run_dir, r, teachers, data)
    default = teachers[r.routing.default]
    curated = filter_answers(run_dir, r.filters, r.data.source, answers, default)
    logits = None
    if r.logit_cache:
        caches = {
            t.name: capture_logits.with_options(task_run_name=f"capture_logits[{t.name}]")(
                run_dir, r.logit_cache, cot, teachers[t.name], curated, t.name
            )
            for t in routed
        }
        logits = join_logit_caches(run_dir, caches)
    return Upstream(data, default, answers, curated, logits, teachers, checked)


@dataclass
class Starts:
    students: list[StudentSection]  # as they train: a pruned or GGUF start replaced by its stage's model folder
    floors: dict[str, OutputRef]  # each pruned copy, untrained, by its report name
    floor_info: dict[str, dict]  # what the report says of each


def starting_points(
    run_dir: Path, r: Recipe, teacher: OutputRef, data: OutputRef, runs: list[StudentSection] | None = None
) -> Starts:
    """Where each student starts: a student with ``init`` from the teacher pruned once per init (the prune stage),
    a student named by a GGUF file from its import; the rest as the recipe says (one started from another student
    keeps its ``init``: ``train_in_order`` resolves it once that student is trained). ``runs``: the students to
    place, the recipe's (``student_runs``) unless a study names its own."""
    cot = r.prompts.cot_text()
    runs = r.student_runs() if runs is None else runs
    inits = dict.fromkeys(s.init for s in runs if isinstance(s.init, PrunedInit))  # each once (seeds share it)
    pruned = {i: prune_teacher(run_dir, i, teacher, data, cot) for i in inits}
    files = dict.fromkeys((s.model, s.dtype) for s in runs if is_gguf_path(s.model))  # one import per file and dtype
    imported = {f: model_location(import_gguf_model(run_dir, *f)) for f in files}
    students = [
        s.model_copy(update={"model": model_location(pruned[s.init]), "init": None})
        if s.init in pruned
        else s.model_copy(update={"model": imported[s.model, s.dtype]})
        if is_gguf_path(s.model)
        else s
        for s in runs
    ]
    return Starts(
        students,
        {i.label: ref for i, ref in pruned.items()},
        {i.label: {"data": f"none ({i.summary()['init']}; untrained)", "untrained": True} for i in pruned},
    )


def train_in_order(
    run_dir: Path,
    students: list[StudentSection],
    template: str,
    teacher: OutputRef,
    data: OutputRef,
    curated: OutputRef | None,
    logits: OutputRef | None,
    routed: RoutedTeachers | None = None,
) -> dict[str, OutputRef]:
    """Each student (as ``starting_points`` returns them), in the recipe's order; one started from another student
    (``init: {from: student}``) starts from that student's trained model folder, whose path carries its key.
    ``routed``: several teachers, handed to the students they score on-policy (``Upstream.routed``)."""
    trained: dict[str, OutputRef] = {}
    for s in students:
        if isinstance(s.init, StudentInit):
            s = s.model_copy(update={"model": model_location(trained[s.init.student]), "init": None})
        scorers = routed if needs_routed_teachers(s) else None
        trained[s.name] = train_student(
            run_dir, s, template, teacher, data, *student_inputs(s, curated, logits), routed=scorers
        )
    return trained


def evaluate_models(
    run_dir: Path, r: Recipe, models: dict[str, OutputRef], teacher: OutputRef, data: OutputRef
) -> dict[str, OutputRef]:
    """Each model's quality, its task run named after it (``evaluate_model[seq-kd@1]``); an API teacher's through its
    API (``evaluate_api_teacher[<model>]``). On instruction data the teacher (with weights) is evaluated first and each
    other model's evaluation takes the teacher's: agreement and KL are measured on its answers to the test prompts."""
    cot = r.prompts.cot_text()

    def evaluate(name: str, model: OutputRef, **teacher_eval: OutputRef) -> OutputRef:
        if name == "teacher" and r.teacher.api:
            return evaluate_api_teacher(run_dir, r.evaluation, cot, r.data.source, r.generation, model, data)
        return evaluate_model.with_options(task_run_name=f"evaluate_model[{name}]")(
            run_dir, r.evaluation, cot, r.data.source, model, teacher, data, **teacher_eval
        )

    if r.teacher.imported:  # nothing of the teacher is here to evaluate (or to score the students' answers on)
        return {name: evaluate(name, model) for name, model in models.items() if name != "teacher"}
    if r.data.source is not DataSource.instructions or r.teacher.api:
        return {name: evaluate(name, model) for name, model in models.items()}
    answers = evaluate("teacher", teacher)
    return {
        name: answers if name == "teacher" else evaluate(name, model, teacher_eval=answers)
        for name, model in models.items()
    }


def with_weights(r: Recipe, models: dict[str, OutputRef]) -> dict[str, OutputRef]:
    """The models whose weights are here to measure: all but an API teacher or an imported dataset's."""
    absent = r.teacher.api or r.teacher.imported
    return {name: ref for name, ref in models.items() if not (name == "teacher" and absent)}


def evaluate_and_report(
    run_dir: Path,
    r: Recipe,
    models: dict[str, OutputRef],
    data: OutputRef,
    curated: OutputRef | None,
    untrained: dict[str, dict] | None = None,
    routed: Upstream | None = None,
    preflight: dict[str, OutputRef] | None = None,
    logits: OutputRef | None = None,
) -> dict:
    """``models``: the teacher (under "teacher") and every student of the recipe; with ``evaluation.quantize``, each
    student's quantized copies join them (``seq-kd-int8``); ``untrained``: what the report says of models in
    ``models`` that no recipe student trained (the pruned floors); ``routed``: with several teachers, the upstream
    chain that made them (each is evaluated on the whole test split and the report shows its figures on its rows);
    ``preflight``: each teacher's preflight output, which the report lists (default: ``routed``'s); ``logits``: the
    logit cache the students read, which the report names (default: ``routed``'s). Returns the report."""
    trained = {s.name: s.summary() for s in r.student_runs()}
    quantized = quantize_students(run_dir, r.evaluation.quantize, {name: models[name] for name in trained})
    # what each quantized copy was made from, for the report's KD × quantization table
    students = {
        **(untrained or {}),
        **trained,
        **{
            quantized_name(name, m): {**info, "quantized": m, "quantized_from": name}
            for m in r.evaluation.quantize
            for name, info in trained.items()
        },
    }
    local = with_weights(r, models)  # an API teacher has no cost figures or benchmarks here (the report says why)
    models = {**models, **quantized}
    evaluations = evaluate_models(run_dir, r, models, models["teacher"], data)
    deployment = measure_deployment(
        run_dir, {**local, **quantized}, r.evaluation.deployment, r.prompts.cot_text(), data, r.evaluation.split
    )
    benchmarks = run_lm_eval(run_dir, local, r.evaluation.lm_eval)  # the harness loads transformers checkpoints only
    judged = (
        judge_students(
            run_dir,
            r.evaluation.judge,
            {s.name: evaluations[s.name] for s in r.student_runs()},
            evaluations["teacher"],
            data,
            r.evaluation.split,
        )
        if r.evaluation.judge
        else None
    )
    teachers = evaluate_teachers(run_dir, r, routed, data) if r.teachers and routed is not None else None
    return write_report(
        run_dir,
        r.run.name,
        models,
        evaluations,
        deployment,
        benchmarks,
        students,
        curated,
        judged,
        r.evaluation.deployment.power,
        r.cost,
        teachers,
        preflight if preflight is not None or routed is None else routed.preflight,
        logits if logits is not None or routed is None else routed.logits,
    )


def evaluate_teachers(run_dir: Path, r: Recipe, u: Upstream, data: OutputRef) -> dict:
    """Each of several teachers evaluated on the whole test split (the default one's evaluation is the "teacher"
    row's, the same key), and what the report's teachers section reads."""
    cot = r.prompts.cot_text()
    evaluations = {}
    for t in r.teachers:
        model = u.teachers[t.name]
        if t.api:
            g = t.generation or r.generation
            evaluations[t.name] = evaluate_api_teacher(run_dir, r.evaluation, cot, r.data.source, g, model, data)
        else:
            evaluations[t.name] = evaluate_model.with_options(task_run_name=f"evaluate_model[teacher {t.name}]")(
                run_dir, r.evaluation, cot, r.data.source, model, model, data
            )
    return {
        "routing": r.routing,
        "evaluations": evaluations,
        "data": data,
        "split": r.evaluation.split,
        "answers": u.answers,
        "curated": u.curated,
        "logits": u.logits,
    }
