"""Classic KD stages: the classifier data, teachers (one per ensemble member), students (hard-label or
distilled) and the reports. Thin Prefect tasks over ``kdflow/classic/digits.py`` (MLPs on the digits) and
``kdflow/classic/hf.py`` (transformers on the generated reviews), content-keyed like every stage.

Every model stage keeps its logits on all three splits (``logits.safetensors``), so that what comes after
it (an ensemble, a student's soft targets, the report) needs only those, never the model itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel
from safetensors.torch import load_file

from kdflow.classic import digits as classifier_kd
from kdflow.classic import omitted
from kdflow.classic.fit import (
    LOGITS,
    SPLITS_FILE,
    class_accuracy_of,
    fit,
    metrics_of,
    read_logits,
    score_omitted,
    transfer_rows,
    write_splits,
)
from kdflow.config.classic import MLP, ClassifierDataSection, DistillSection, OmittedClassSection, Transformer
from kdflow.reporting.run_report import REPORT_JSON, REPORT_MD
from kdflow.store.outputs import OutputRef, write_atomic
from kdflow.store.stage import Stage
from tasks.artifacts import artifact_key
from tasks.caching import STAGE_RESULTS, StageCache

DATA = Stage("classifier-data", "1", lambda section: {"section": section}, files=(SPLITS_FILE,))
TEACHER = Stage(
    "classifier-teacher", "1", lambda model, data, seed: {"model": model, "data": data, "seed": seed}, files=(LOGITS,)
)
# omit_class enters the key only when set, so that every student made before it existed keeps its key
STUDENT = Stage(
    "classifier-student",
    "1",
    lambda model, data, teachers, distill, seed, omit_class=None: {
        "model": model,
        "data": data,
        "teachers": teachers,
        "distill": distill,
        "seed": seed,
        **({} if omit_class is None else {"omit_class": omit_class}),
    },
    files=(LOGITS,),
)


@task(cache_policy=StageCache(DATA), **STAGE_RESULTS, task_run_name="classifier_data[{section.source.value}]")
def classifier_data(run_dir: Path, section: ClassifierDataSection) -> OutputRef:
    """The train / val / test splits as tensors (``splits.safetensors``); for reviews also the tokenizer
    and the generated rows as text (``rows.jsonl``)."""
    out = DATA.output(run_dir, section=section)
    if done := out.done:
        return done
    with out.building() as tmp:
        splits = write_splits(section, tmp)
        counts = {name: len(s) for name, s in splits.items()}
        out.finish(tmp, rows=sum(counts.values()), splits=counts, source=section.source.value)
    return out.ref()


# No retries: a failed training run is a bug or a bad recipe, not a blip.
@task(
    cache_policy=StageCache(TEACHER),
    **STAGE_RESULTS,
    task_run_name="train_classifier_teacher[{model.kind} seed {seed}]",
)
def train_classifier_teacher(run_dir: Path, model: MLP | Transformer, data: OutputRef, seed: int) -> OutputRef:
    """One teacher (or one ensemble member: members differ by ``seed`` only), on hard labels."""
    out = TEACHER.output(run_dir, model=model, data=data, seed=seed)
    if done := out.done:
        return done
    with out.building() as tmp:
        start = time.perf_counter()
        params = fit(model, data, seed, tmp)
        logits = load_file(tmp / LOGITS)
        out.finish(
            tmp,
            rows=data.manifest()["splits"]["train"],
            params=params,
            metrics=metrics_of(logits, data),
            seconds=round(time.perf_counter() - start, 1),
        )
    return out.ref()


def _student_name(parameters: dict) -> str:
    """``train_classifier_student[mlp seed 0 hard labels]`` or ``[... KD from 3 teachers, alpha 0.5, T 4.0]``."""
    distill, teachers = parameters["distill"], parameters["teachers"]
    how = (
        "hard labels"
        if distill is None
        else (
            f"KD from {len(teachers)} teacher{'s' * (len(teachers) > 1)}, "
            f"alpha {distill.alpha}, T {distill.temperature}"
        )
    )
    if parameters.get("omit_class") is not None:
        how += f", no {parameters['omit_class']}s"
    return f"train_classifier_student[{parameters['model'].kind} seed {parameters['seed']} {how}]"


@task(cache_policy=StageCache(STUDENT), **STAGE_RESULTS, task_run_name=_student_name)
def train_classifier_student(
    run_dir: Path,
    model: MLP | Transformer,
    data: OutputRef,
    teachers: list[OutputRef],
    distill: DistillSection | None,
    seed: int,
    omit_class: int | None = None,
) -> OutputRef:
    """A student: hard labels only (``teachers=[]``, ``distill=None``: the baseline, keyed without any
    teacher so that a new teacher does not retrain it), or Hinton's loss against the soft targets of the
    ``teachers``' ensemble (one teacher is an ensemble of one). ``omit_class``: its transfer set is the
    training split without that class (Hinton's omitted class); ``rows`` counts what it trained on."""
    if (distill is None) != (not teachers):
        raise ValueError("a distilled student needs both teachers and a distill section; a baseline neither")
    out = STUDENT.output(
        run_dir, model=model, data=data, teachers=teachers, distill=distill, seed=seed, omit_class=omit_class
    )
    if done := out.done:
        return done
    with out.building() as tmp:
        start = time.perf_counter()
        if distill is None:
            params = fit(model, data, seed, tmp, omit_class=omit_class)
        else:
            soft = classifier_kd.ensemble_logits([read_logits(t, "train") for t in teachers])
            params = fit(model, data, seed, tmp, soft, distill.alpha, distill.temperature, omit_class)
        out.finish(
            tmp,
            rows=transfer_rows(data, omit_class),
            params=params,
            omit_class=omit_class,
            metrics=metrics_of(load_file(tmp / LOGITS), data),
            seconds=round(time.perf_counter() - start, 1),
        )
    return out.ref()


# Cheap (an average of saved logits), so not cached.
@task
def score_ensemble(data: OutputRef, members: list[OutputRef]) -> dict:
    """The ensemble's val / test metrics (mean of the members' log-probabilities) and its total size."""
    logits = {
        split: classifier_kd.ensemble_logits([read_logits(m, split) for m in members]) for split in ("val", "test")
    }
    return {"metrics": metrics_of(logits, data), "params": sum(m.manifest()["params"] for m in members)}


class SeedRun(BaseModel):
    """What one experiment seed produced: the teacher's members (the first is "the single teacher"), the
    hard-label student and the distilled student; with an omitted class, also both students trained without it."""

    seed: int
    members: list[OutputRef]
    ensemble: dict
    hard: OutputRef
    kd: OutputRef
    hard_omitted: OutputRef | None = None
    kd_omitted: OutputRef | None = None


def seed_metrics(run: SeedRun) -> dict[str, dict]:
    """Model name -> {params, val, test} for one seed (the names the reports use)."""
    single = run.members[0].manifest()
    hard, kd = run.hard.manifest(), run.kd.manifest()
    return {
        "teacher": {"params": single["params"], **single["metrics"]},
        f"ensemble of {len(run.members)}": {"params": run.ensemble["params"], **run.ensemble["metrics"]},
        "hard-label student": {"params": hard["params"], **hard["metrics"]},
        "KD student": {"params": kd["params"], **kd["metrics"]},
    }


def omitted_section(data: OutputRef, label: int, runs: list[SeedRun]) -> dict:
    """The report's omitted-class figures: both students trained without class ``label`` (bias raise chosen on
    val), beside the teacher ensemble and the usual KD student, which did see the class."""
    students = {
        r.seed: {
            "hard-label student": score_omitted(r.hard_omitted, data, label),
            "KD student": score_omitted(r.kd_omitted, data, label),
        }
        for r in runs
    }
    ensemble = lambda r: classifier_kd.ensemble_logits([read_logits(m, "test") for m in r.members])  # noqa: E731
    references = {
        r.seed: {
            f"ensemble of {len(r.members)}": class_accuracy_of(ensemble(r), data, "test", label),
            "KD student (all classes)": class_accuracy_of(read_logits(r.kd, "test"), data, "test", label),
        }
        for r in runs
    }
    return omitted.summarize(label, runs[0].kd_omitted.manifest()["rows"], students, references)


# Cheap and its outputs live outside any stage folder, so it always runs (no cache).
@task
def write_classifier_report(
    run_dir: Path,
    run_name: str,
    data: OutputRef,
    distill: DistillSection,
    runs: list[SeedRun],
    omitted_class: OmittedClassSection | None = None,
) -> dict:
    """``report.json``, ``report.md`` and ``report.png`` at the top of the run folder, and Prefect
    artifacts ``<run>-report`` (markdown, with the plot) and ``<run>-table`` (table)."""
    per_seed = {r.seed: seed_metrics(r) for r in runs}
    report = classifier_kd.summarize(run_name, data.manifest(), distill.model_dump(), per_seed)
    extra = ""
    if omitted_class is not None:
        report["omitted_class"] = omitted_section(data, omitted_class.label, runs)
        extra = "\n" + omitted.render_markdown(report["omitted_class"])
    png = classifier_kd.plot_models(report)
    run_dir = Path(run_dir)
    write_atomic(run_dir / "report.png", png)
    markdown = classifier_kd.render_markdown(report, plot="report.png") + extra
    write_atomic(run_dir / REPORT_JSON, json.dumps(report, indent=2))
    write_atomic(run_dir / REPORT_MD, markdown)
    create_markdown_artifact(
        key=artifact_key(run_name, "report"),
        markdown=classifier_kd.render_markdown(report, png=png) + extra,
        description=f"classic KD report for {run_name} ({run_dir / REPORT_MD})",
    )
    create_table_artifact(
        key=artifact_key(run_name, "table"),
        table=classifier_kd.table_rows(report),
        description=f"test accuracy per model, mean and spread over seeds {report['seeds']}",
    )
    return report


class SweepSeed(BaseModel):
    """The fixed models of one seed in a sweep: the members, each ensemble size's score, the baseline."""

    seed: int
    members: list[OutputRef]
    ensembles: dict[int, dict]
    hard: OutputRef


class SweepPoint(BaseModel):
    """One distilled student of a sweep: from the first ``ensemble`` members, at (alpha, temperature)."""

    seed: int
    ensemble: int
    alpha: float
    temperature: float
    student: OutputRef


def _model_metrics(ref: OutputRef) -> dict:
    m = ref.manifest()
    return {"params": m["params"], **m["metrics"]}


@task
def write_sweep_report(
    run_dir: Path, run_name: str, data: OutputRef, seeds: list[SweepSeed], points: list[SweepPoint]
) -> dict:
    """``sweep-report.json``, ``sweep-report.md`` and ``sweep.png`` at the top of the run folder, and
    Prefect artifacts ``<run>-sweep-report`` (markdown, with the plot) and ``<run>-sweep-table``."""
    references = {}
    for s in seeds:
        ensembles = {
            f"ensemble of {k}": {"params": e["params"], **e["metrics"]} for k, e in s.ensembles.items() if k > 1
        }
        references[s.seed] = {
            "teacher": _model_metrics(s.members[0]),
            **ensembles,
            "hard-label student": _model_metrics(s.hard),
        }
    rows = [
        {
            "seed": p.seed,
            "ensemble": p.ensemble,
            "alpha": p.alpha,
            "temperature": p.temperature,
            **_model_metrics(p.student),
        }
        for p in points
    ]
    sweep = classifier_kd.summarize_sweep(run_name, data.manifest(), references, rows)
    png = classifier_kd.plot_sweep(sweep)
    run_dir = Path(run_dir)
    write_atomic(run_dir / "sweep.png", png)
    write_atomic(run_dir / "sweep-report.json", json.dumps(sweep, indent=2))
    write_atomic(run_dir / "sweep-report.md", classifier_kd.render_sweep_markdown(sweep, plot="sweep.png"))
    create_markdown_artifact(
        key=artifact_key(run_name, "sweep-report"),
        markdown=classifier_kd.render_sweep_markdown(sweep, png=png),
        description=f"classic KD sweep for {run_name} ({run_dir / 'sweep-report.md'})",
    )
    create_table_artifact(
        key=artifact_key(run_name, "sweep-table"),
        table=classifier_kd.sweep_table_rows(sweep),
        description=f"KD student test accuracy per (ensemble size, alpha, T) over seeds {sweep['seeds']}",
    )
    return sweep
