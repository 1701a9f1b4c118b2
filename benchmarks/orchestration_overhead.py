"""Prefect orchestration overhead: the distill flow's stages run through the flow vs the same stage
functions called directly (``task.fn``), same inputs, alternating, several repetitions.

Both paths do all the work: the Prefect cache is bypassed (refresh) and every repetition writes to a
fresh run folder, so no stage is skipped. The miniature recipe keeps a repetition short, which makes
this an upper bound on the relative overhead (with the demo's minutes of training it is far smaller).
Prints the medians, then, last, the ratio flow / direct.

    python benchmarks/orchestration_overhead.py [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import prefect_env  # noqa: F401  (before anything imports prefect)

# isort: split
from results import save


def recipe_in(root: Path) -> str:
    text = (ROOT / "tests" / "mini.yaml").read_text().replace("root: runs", f"root: {root}")
    path = root / "mini.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def direct(recipe_path: str) -> dict:
    """The distill flow's body with every task's plain function: no Prefect in the loop."""
    from kdflow.config.recipe import load_recipe
    from kdflow.config.student import StudentData
    from tasks.curate import filter_answers
    from tasks.data import make_data
    from tasks.evaluate import evaluate_model, measure_deployment, run_lm_eval
    from tasks.generate import generate_answers
    from tasks.report import write_report
    from tasks.students import train_student
    from tasks.teacher import train_teacher_model

    r = load_recipe(recipe_path)
    run_dir, cot = r.run_dir, r.prompts.cot_text()
    data = make_data.fn(run_dir, r.data)
    teacher = train_teacher_model.fn(run_dir, r.teacher, data, cot)
    answers = generate_answers.fn(run_dir, r.generation, cot, teacher, data)
    curated = filter_answers.fn(run_dir, r.filters, r.data.source, answers)
    students = {
        s.name: train_student.fn(run_dir, s, cot, teacher, data, curated if s.data is StudentData.teacher else None)
        for s in r.students
    }
    models = {"teacher": teacher, **students}
    evaluations = {
        name: evaluate_model.fn(run_dir, r.evaluation, cot, r.data.source, model, teacher, data)
        for name, model in models.items()
    }
    deployment = measure_deployment.fn(run_dir, models, r.evaluation.deployment, cot, data, r.evaluation.split)
    benchmarks = run_lm_eval.fn(run_dir, models, r.evaluation.lm_eval)
    return write_report.fn(
        run_dir,
        r.run.name,
        models,
        evaluations,
        deployment,
        benchmarks,
        {s.name: {"data": s.data.value} for s in r.students},
        curated,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    from prefect import flow
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from flows.distill import distill

    work = Path(tempfile.mkdtemp(prefix="kdflow-bench-"))
    start = time.perf_counter()
    flow(name="warm-up")(lambda: None)()  # starts the temporary local server once; not part of either side
    server_start = time.perf_counter() - start

    times: dict[str, list[float]] = {"flow": [], "direct": []}
    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        for rep in range(args.reps):
            for name, run in (("flow", distill), ("direct", direct)):
                recipe = recipe_in(work / f"{name}-{rep}")
                start = time.perf_counter()
                run(recipe)
                times[name].append(time.perf_counter() - start)
                print(f"rep {rep} {name:>6}: {times[name][-1]:.2f} s", flush=True)

    flow_s, direct_s = statistics.median(times["flow"]), statistics.median(times["direct"])
    result = {
        "reps": args.reps,
        "server_start_s": round(server_start, 2),
        "flow_median_s": round(flow_s, 2),
        "direct_median_s": round(direct_s, 2),
        "ratio_flow_over_direct": round(flow_s / direct_s, 3),
    }
    save("orchestration_overhead", {**result, "times": times})
    print(f"temporary Prefect server start (once, excluded): {server_start:.1f} s")
    print(f"median through the flow: {flow_s:.2f} s, stage functions called directly: {direct_s:.2f} s")
    print(f"orchestration overhead ratio (flow / direct): {flow_s / direct_s:.3f}")


if __name__ == "__main__":
    main()
