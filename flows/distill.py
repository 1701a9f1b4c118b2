"""The whole distillation, top to bottom: data → teacher → teacher's CoT answers → filter → students →
evaluation (quality per model; cost of all models, measured back to back; an LLM judge's win rate
against the teacher where the recipe names a judge; lm-eval where it can run) → report.
Every stage is a content-cached task: a rerun redoes only what changed.

    python -m flows.distill recipes/demo.yaml [--seeds 0 1 2] [--students seq-kd logit-fkl]
"""

from __future__ import annotations

from prefect import flow

from flows.chain import evaluate_and_report, starting_points, train_in_order, upstream
from flows.cli import run_as_script
from kdflow.config.recipe import load_recipe
from kdflow.reporting.run_report import REPORT_JSON, REPORT_MD
from kdflow.reporting.summary import summary_lines
from kdflow.store.remote import push_files


# No log_prints: with print patched by Prefect, the datasets library's fingerprinting of TRL's map functions
# dumps their bytecode into the run log (thousands of lines per training stage).
@flow(name="distill")
def distill(
    recipe: str = "recipes/demo.yaml", seeds: list[int] | None = None, students: list[str] | None = None
) -> dict:
    r = load_recipe(recipe)  # a bad recipe fails here, before any work
    if students:  # only these students (the others' outputs stay in the run folder)
        r = r.with_students(students)
    if seeds:  # every student once per seed, on the same cached teacher, answers and logits
        r = r.with_seeds(seeds)
    run_dir, cot = r.run_dir, r.prompts.cot_text()

    u = upstream(r, r.evaluation.judge)  # API keys checked; data → teacher → answers → curated → logit cache
    starts = starting_points(run_dir, r, u.teacher, u.data)  # students pruned from the teacher or named by a GGUF file
    students = train_in_order(run_dir, starts.students, cot, u.teacher, u.data, u.curated, u.logits, u.routed(r))
    report = evaluate_and_report(
        run_dir, r, {"teacher": u.teacher, **starts.floors, **students}, u.data, u.curated, starts.floor_info, u
    )
    if r.run.url:  # the report beside the stage outputs on remote storage (each stage uploads its own)
        push_files(run_dir, [REPORT_JSON, REPORT_MD, *report["plots"]], r.run.url)
    print("\n".join(summary_lines(report, run_dir / REPORT_MD)))
    return report


if __name__ == "__main__":
    run_as_script("distill")  # the same arguments and --help as `kdflow distill`
