"""Stage 6: report.json, report.md and the plots at the top of the run folder, and Prefect artifacts
``<run>-report`` (markdown, plots embedded) and ``<run>-table`` (one row per model)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from prefect.logging import get_logger

from kdflow.config.cost import CostSection
from kdflow.config.evaluation import DEFAULT_POWER, PowerFigure
from kdflow.config.teachers import Routing
from kdflow.curation.pipeline import DROPPED, KEPT, reason_counts
from kdflow.evaluation.api_model import IMPORTED_ONLY
from kdflow.evaluation.devices import ROOFLINE_FORMULA, device_table, roofline
from kdflow.evaluation.energy import ENERGY_FORMULA, energy_per_token
from kdflow.evaluation.model_metrics import PREDICTIONS, read_metrics
from kdflow.evaluation.preflight import REPORT_JSON as PREFLIGHT_JSON
from kdflow.evaluation.traffic import INTENSITY_FORMULA
from kdflow.logit_cache.format import MANIFEST as CACHE_MANIFEST
from kdflow.reporting.ledger import build_ledger
from kdflow.reporting.plots import plot_losses, plot_tradeoff
from kdflow.reporting.preflight_report import preflight_markdown, preflight_summary
from kdflow.reporting.run_report import REPORT_JSON, REPORT_MD, build_report, embed, render_markdown, table_rows
from kdflow.reporting.teachers import routed_figures, teachers_markdown
from kdflow.reporting.topk_report import with_warnings
from kdflow.store.model_folders import LOG_HISTORY
from kdflow.store.outputs import OutputRef, write_atomic
from kdflow.store.run_folder import read_split
from kdflow.teacher.routing import TEACHER_COLUMN
from tasks.artifacts import artifact_key
from tasks.progress import bounded

LOSS_PLOT, TRADEOFF_PLOT = "report-loss.png", "report-tradeoff.png"


def training_history(model: OutputRef) -> list[dict]:
    """The trainer's log history saved next to a trained model; none for a model that was not trained here."""
    path = Path(model.path) / LOG_HISTORY
    return json.loads(path.read_text()) if path.is_file() else []


def trained(model: OutputRef) -> dict:
    """What a student's manifest says of its training that the report shows: an on-policy student's accounting, a
    top-k KD student's diagnostics (with the values that should worry a reader)."""
    manifest = model.manifest()
    on_policy, topk = manifest.get("on_policy"), with_warnings(manifest.get("topk") or {})
    return {**({"on_policy": on_policy} if on_policy else {}), **({"topk": topk} if topk else {})}


def origin(teacher: OutputRef) -> dict:
    """Where a teacher the recipe named came from, for the report's "trained on" column: a GGUF file dequantized by
    the import-gguf stage, or a model folder / hub id; {} for a teacher trained here."""
    m = teacher.manifest()
    if m.get("dequantized"):
        return {
            "origin": f"given: {m['gguf']} ({m.get('model_name') or m['architecture']}, {m['quantization']} GGUF), "
            f"dequantized to {m['dtype']}"
        }
    return {"origin": f"given: {m['given']}"} if m.get("given") else {}


def imported_teacher(metrics: dict[str, dict], logits: OutputRef | None) -> dict:
    """The teacher row of a run whose teacher is known only by its imported logit dataset: the model the dataset
    records, no figures (the quality metric present, as None, so that the report judges by the students' metric), and
    the split the students were evaluated on."""
    first = next(iter(metrics.values()))
    key = "rouge_l" if "rouge_l" in first else "accuracy"
    source = logit_source(logits) if logits is not None else None
    recorded = source["teachers"][0] if source and source["named_teacher"] and source["teachers"] else None
    return {
        "imported": True,
        "model": recorded or "the model that made the imported logit dataset",
        "weights": IMPORTED_ONLY,
        key: None,
        "params": None,
        **{k: first.get(k) for k in ("split", "rows")},
    }


def cost(figures: dict | None, power: PowerFigure) -> dict:
    """A model's deployment figures with its energy per token (measured, else estimated from ``power``) and its
    roofline bound per device profile; {} for a model with none (an API teacher)."""
    if figures is None:
        return {}
    return {**figures, **energy_per_token(figures, power.watts, power.source), "roofline": roofline(figures)}


def flow_started() -> datetime | None:
    """When the flow run writing the report started (its Running state's time; else when it was to start): an output
    made since was made in this run, an older one reused. None outside a flow run."""
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    if run is None:
        return None
    return run.state.timestamp if run.state is not None and run.state.is_running() else run.expected_start_time


def teacher_section(
    routing: Routing,
    evaluations: dict[str, OutputRef],
    data: OutputRef,
    split: str,
    answers: OutputRef,
    curated: OutputRef,
    logits: OutputRef | None = None,
) -> dict:
    """The report's ``teachers`` (kdflow/reporting/teachers.py) from the stage outputs: each teacher's evaluation on
    the whole test split, the joined answers and logit cache, the curated rows (their ``teacher`` column)."""
    kept = pd.read_parquet(Path(curated.path) / KEPT)
    return routed_figures(
        routing,
        [{**r, "split": split} for r in read_split(data, split)],
        {name: pd.read_parquet(Path(ref.path) / PREDICTIONS).to_dict("records") for name, ref in evaluations.items()},
        answers.manifest(),
        None if logits is None else logits.manifest(),
        kept[TEACHER_COLUMN].value_counts().to_dict() if TEACHER_COLUMN in kept else None,
    )


def logit_source(logits: OutputRef) -> dict:
    """What the report says of the students' logit cache: its stage manifest's source, rows and top-k; an import's
    files with their sha256; the teacher its cache manifest records (an import names one only where its recipe did)."""
    m = logits.manifest()
    cache = json.loads((Path(logits.path) / CACHE_MANIFEST).read_text())
    teachers = [t["model"] for t in cache.get("teachers", [])]
    files = [{"file": f["file"], "sha256": f["sha256"]} for f in m.get("imported_from") or []]
    return {
        "source": m.get("source"),
        "rows": cache["rows"],  # from the cache's own manifest, which the output's sha256 covers
        "k": cache.get("k"),
        "teachers": teachers,
        "files": files,
        # unnamed, an import records "<format>:<first file>" as its teacher (kdflow/logit_cache/interop.py)
        "named_teacher": bool(files) and teachers[:1] != [f"{m['source'].removeprefix('import:')}:{files[0]['file']}"],
    }


# Cheap and its outputs live outside any stage folder, so it always runs (no cache).
def curation_figures(curated: OutputRef) -> dict:
    """The curation's counts, from its files: the output's sha256 covers those, not the figures its manifest repeats,
    so a hand edit of the manifest cannot reach the report (the ninth audit's #29)."""
    kept = pq.read_metadata(Path(curated.path) / KEPT).num_rows
    dropped = pd.read_parquet(Path(curated.path) / DROPPED)
    reasons = dropped["reasons"] if len(dropped) else []
    return {
        "input_rows": kept + len(dropped),
        "kept": kept,
        "dropped": len(dropped),
        "drop_reasons": reason_counts([{"reasons": list(r)} for r in reasons]),
    }


@task
def write_report(
    run_dir: Path,
    run_name: str,
    models: dict[str, OutputRef],
    evaluations: dict[str, OutputRef],
    deployment: OutputRef,
    lm_eval: dict,
    students: dict[str, dict],
    curated: OutputRef | None,
    judge: OutputRef | None = None,
    power: PowerFigure = DEFAULT_POWER,
    prices: CostSection | None = None,
    routed: dict | None = None,
    preflight: dict[str, OutputRef] | None = None,
    logits: OutputRef | None = None,
) -> dict:
    """``models`` and ``evaluations``: per model ("teacher" and each student by name) its trained model and
    its evaluate-stage output; ``deployment``: the measure_deployment output for all of them; ``students``:
    what each student was trained on (its recipe ``data`` field); ``judge``: the judge_students output, None
    when the recipe names no judge (the report says it was not run); ``power``: the recipe's stated power, for the
    energy of models no counter measured (``energy_source: estimated``); ``prices``: the recipe's ``cost`` section, for
    the cost ledger's money (tokens and device-hours without it); ``routed``: with several teachers, what
    ``teacher_section`` reads (the teacher row then is the routed teachers', each test row answered by its own);
    ``preflight``: each teacher's preflight-stage output by name, None or {} when none ran (then no section);
    ``logits``: the logit cache the students read (captured, joined from routed teachers, or imported), which the
    report names; None when no student read one."""
    dep = deployment.manifest()
    # An API teacher has no deployment figures (nothing of it runs here).
    metrics = {
        name: {**read_metrics(ref.path), **cost(dep["figures"].get(name), power)} for name, ref in evaluations.items()
    }
    if "teacher" not in evaluations:  # known only by an imported logit dataset: nothing of it ran here
        metrics["teacher"] = imported_teacher(metrics, logits)
    teachers = teacher_section(**routed) if routed else None
    if (
        teachers and teachers["routed_accuracy"] is not None
    ):  # the students' gap is measured against the teachers they learnt from, each on its own rows
        metrics["teacher"] = {**metrics["teacher"], "accuracy": teachers["routed_accuracy"]}
    report = build_report(
        run_name,
        teacher={**metrics["teacher"], **origin(models["teacher"])},
        students={name: {**metrics[name], **info, **trained(models[name])} for name, info in students.items()},
        curation=None  # no student learnt from the teacher's answers (an imported logit cache): none were asked for
        if curated is None
        else curation_figures(curated),
        deployment={
            **{k: dep.get(k) for k in ("machine", "settings", "flops_formula", "traffic_formula", "energy")},
            "intensity_formula": INTENSITY_FORMULA,
            "energy_formula": ENERGY_FORMULA,
            "roofline_formula": ROOFLINE_FORMULA,
            "power": power.model_dump(),
            "devices": device_table(),
        },
        lm_eval=lm_eval,
        judge=None if judge is None else {k: judge.manifest()[k] for k in ("judge", "split", "questions", "win_rates")},
    )
    # what every output behind the report cost to make, read from their manifests (kdflow/reporting/ledger.py)
    report["ledger"] = build_ledger(
        run_dir,
        {name: [models[name], evaluations[name]] for name in students},
        {
            "teacher": [models["teacher"], evaluations.get("teacher")],
            "deployment": [deployment],
            "curation": [curated],
            "judge": [judge],
        },
        {name: s.get("gap_closure") for name, s in report["students"].items()},
        prices,
        flow_started(),
    )
    run_dir = Path(run_dir)
    plots = {
        "training loss per model": (LOSS_PLOT, plot_losses({n: training_history(m) for n, m in models.items()})),
        "accuracy vs parameters and latency": (TRADEOFF_PLOT, plot_tradeoff(report)),
    }
    plots = {title: (name, png) for title, (name, png) in plots.items() if png is not None}
    for name, png in plots.values():
        write_atomic(run_dir / name, png)
    report["plots"] = [name for name, _ in plots.values()]
    report["teachers"] = teachers
    report["logit_cache"] = None if logits is None else logit_source(logits)
    checked = {
        name: json.loads((Path(ref.path) / PREFLIGHT_JSON).read_text()) for name, ref in (preflight or {}).items()
    }
    report["preflight"] = preflight_summary(checked)
    sections = teachers_markdown(teachers, report["students"]) + preflight_markdown(checked)
    write_atomic(run_dir / REPORT_JSON, json.dumps(report, indent=2))
    write_atomic(run_dir / REPORT_MD, render_markdown(report, {t: name for t, (name, _) in plots.items()}) + sections)
    publish(
        create_markdown_artifact,
        key=artifact_key(run_name, "report"),
        markdown=render_markdown(report, {t: embed(png) for t, (_, png) in plots.items()}) + sections,
        description=f"kdflow report for {run_name} ({run_dir / REPORT_MD})",
    )
    publish(
        create_table_artifact,
        key=artifact_key(run_name, "table"),
        table=table_rows(report),
        description=f"quality and cost per model, {run_name}",
    )
    return report


def publish(create, **artifact) -> bool:
    """One report artifact, best effort: it is a view of report.md and report.json, already written. A Prefect
    API that has gone away (a refused connection, a timeout) must not fail a run whose every output is on disk;
    it is logged, and False returned."""
    try:
        bounded(create, **artifact)
        return True
    except Exception as e:  # noqa: BLE001 -- whatever breaks the view must not break the run
        get_logger("kdflow.report").warning(
            f"report artifact {artifact.get('key')!r} not published ({type(e).__name__}: {e}); "
            "the report is in the run folder"
        )
        return False
