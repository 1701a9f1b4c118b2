"""Learning curves: which method gets a student there in fewer steps, or less time? A study recipe's arms (students
of a distillation recipe, and added ones), each trained once per seed with evenly spaced snapshots; every snapshot
answers the test split, scored as the evaluate stage scores that data (accuracy, or ROUGE-L on instruction data); a
table, a two-panel plot (quality vs steps, vs wall time, the teacher's figure as a line) and the verdicts
(kdflow/reporting/curves.py). Not part of `make demo`: it trains arms × seeds students.

    python -m flows.learning_curves recipes/sweeps/study-curves.yaml
    python -m flows.learning_curves recipes/sweeps/study-curves-smollm2.yaml    # ROUGE-L, SmolLM2 (hours)
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from flows.chain import starting_points, upstream
from flows.cli import run_as_script
from kdflow.config.recipe import load_recipe
from kdflow.config.student import StudentInit, StudentSection
from kdflow.config.study import StudyRecipe, load_study
from kdflow.evaluation.curves import CURVE_FILE
from kdflow.evaluation.model_metrics import read_metrics
from kdflow.reporting import curves as cv
from kdflow.reporting.quality_metric import source_metric
from kdflow.store.model_folders import model_location
from kdflow.store.outputs import OutputRef, write_atomic
from kdflow.training.curves import curve_steps, read_curve
from kdflow.training.student import needs_routed_teachers, student_inputs
from tasks.curves import evaluate_curve
from tasks.evaluate import evaluate_model
from tasks.students import train_student


def check_warm_starts(s: StudyRecipe, arms: list[StudentSection]) -> None:
    """Each warm start names a step its source arm saves a snapshot at; said before any training."""
    by_name = {a.name: a for a in arms}
    for arm, warm in s.warm_starts.items():
        max_steps = s.training_of(by_name[warm.student]).get("max_steps")
        if not max_steps or max_steps < 1:
            raise ValueError(f"warm_starts.{arm}: {warm.student!r} needs training.max_steps for its snapshot steps")
        steps = curve_steps(max_steps, s.curve_points)
        if warm.step not in steps[:-1]:
            raise ValueError(
                f"warm_starts.{arm}.step {warm.step}: {warm.student!r} saves snapshots at {steps[:-1]} "
                f"(curve_points {s.curve_points} over {max_steps} steps); pick one of those"
            )


def warm_section(section: StudentSection, source: OutputRef, step: int) -> StudentSection:
    """``section`` trained from ``source``'s snapshot at ``step`` (a folder named by the source's content key)."""
    snapshot = Path(source.path) / "curve" / f"step-{step}"
    return section.model_copy(update={"model": str(snapshot), "architecture": None})


def start_of(
    section: StudentSection, s: StudyRecipe, trained: dict[str, OutputRef], offsets: dict[str, tuple[int, float]]
) -> tuple[StudentSection, tuple[int, float] | None]:
    """The run as it trains, and the (step, seconds) its curve is counted from, so that its steps and time include
    those of the run it starts from (and of that run's own start): a warm start's snapshot; the same seed's trained
    arm that ``init: {from: student}`` names, from its last point; else the section as it is and None."""
    arm, seed = cv.arm_of(section.name)
    if arm in s.warm_starts:
        warm = s.warm_starts[arm]
        source_name, step = f"{warm.student}@{seed}", warm.step
        section = warm_section(section, trained[source_name], step)
    elif isinstance(section.init, StudentInit):
        source_name = section.init.student  # seeded by the study: <arm>@<seed>
        step = read_curve(Path(trained[source_name].path))["points"][-1]["step"]
        section = section.model_copy(update={"model": model_location(trained[source_name]), "init": None})
    else:
        return section, None
    point = next(p for p in read_curve(Path(trained[source_name].path))["points"] if p["step"] == step)
    before_step, before_seconds = offsets.get(source_name, (0, 0.0))
    return section, (before_step + step, before_seconds + point["seconds"])


# No log_prints (see flows/distill.py).
@flow(name="learning-curves")
def learning_curves(study: str = "recipes/sweeps/study-curves.yaml") -> dict:
    s = load_study(study)  # a bad study or recipe fails here, before any work
    r = load_recipe(s.recipe_path())
    run_dir, cot, metric = r.run_dir, r.prompts.cot_text(), source_metric(r.data.source)
    check_warm_starts(s, s.arms(r))

    u = upstream(r)  # cached: a study after `make demo` starts at the students
    trained: dict[str, OutputRef] = {}
    offsets: dict[str, tuple[int, float]] = {}
    # pruned from the teacher or named by a GGUF file: placed as the distill flow places them (the prune stage, cached)
    runs = starting_points(run_dir, r, u.teacher, u.data, s.runs(r)).students
    for st in runs:  # warm-started arms come last, after the arms they start from
        st, offset = start_of(st, s, trained, offsets)
        if offset is not None:
            offsets[st.name] = offset
        routed = u.routed(r) if needs_routed_teachers(st) else None  # several teachers scoring an on-policy arm
        trained[st.name] = train_student(
            run_dir, st, cot, u.teacher, u.data, *student_inputs(st, u.curated, u.logits), routed=routed
        )

    curves = {}
    for name, ref in trained.items():
        out = evaluate_curve.with_options(task_run_name=f"curve[{name}]")(
            run_dir, r.evaluation, cot, r.data.source, ref, u.data
        )
        points = json.loads((Path(out.path) / CURVE_FILE).read_text())["points"]
        curves[name] = cv.shifted(points, *offsets[name]) if name in offsets else points
    teacher = None
    if not r.teacher.api:  # cached after `make demo`
        evaluated = evaluate_model.with_options(task_run_name="evaluate[teacher]")(
            run_dir, r.evaluation, cot, r.data.source, u.teacher, u.teacher, u.data
        )
        teacher = read_metrics(evaluated.path)[metric]

    summary = cv.summarise(curves, s.reference, teacher, metric)
    out = run_dir / "studies" / Path(study).stem  # beside the stage folders (curves/ is the curves stage)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "curves.png", cv.plot_curves(summary))
    write_atomic(
        out / "curves.json", json.dumps({"study": s.model_dump(mode="json"), "curves": curves, **summary}, indent=1)
    )
    write_atomic(out / "curves.md", cv.render(summary, "curves.png", f"kdflow learning curves: {Path(study).stem}"))
    print(f"curves report: {out / 'curves.md'}")
    print("\n".join(cv.verdict_lines(summary)))
    return summary


if __name__ == "__main__":
    run_as_script("curves")  # the same arguments and --help as `kdflow curves`
