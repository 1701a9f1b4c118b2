"""The whole distillation, top to bottom: data → teacher → teacher's CoT answers → filter → students →
evaluation (quality per model; cost of all models, measured back to back; an LLM judge's win rate
against the teacher where the recipe names a judge; lm-eval where it can run) → report.
Every stage is a content-cached task: a rerun redoes only what changed.

    python -m flows.distill recipes/demo.yaml [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse

from prefect import flow

from flows.train_teacher import train_teacher
from kdflow.config.recipe import load_recipe
from kdflow.store.remote import push_files
from tasks.capture import capture_logits
from tasks.curate import filter_answers
from tasks.data import make_data
from tasks.evaluate import evaluate_model, judge_students, measure_deployment, run_lm_eval
from tasks.generate import generate_answers
from tasks.report import write_report
from kdflow.training.student import student_inputs
from tasks.students import train_student


# No log_prints: with print patched by Prefect, the datasets library's fingerprinting of TRL's map functions
# dumps their bytecode into the run log (thousands of lines per training stage).
@flow(name="distill")
def distill(recipe: str = "recipes/demo.yaml", seeds: list[int] | None = None) -> dict:
    r = load_recipe(recipe)  # a bad recipe fails here, before any work
    if seeds:  # every student once per seed, on the same cached teacher, answers and logits
        r = r.with_seeds(seeds)
    run_dir, cot = r.run_dir, r.prompts.cot_text()

    data = make_data(run_dir, r.data)
    teacher = train_teacher(recipe)
    answers = generate_answers(run_dir, r.generation, cot, teacher, data)
    curated = filter_answers(run_dir, r.filters, r.data.source, answers, teacher)
    logits = capture_logits(run_dir, r.logit_cache, cot, teacher, curated) if r.logit_cache else None  # KD from disk
    students = {s.name: train_student(run_dir, s, cot, teacher, data, *student_inputs(s, curated, logits))
                for s in r.student_runs()}
    models = {"teacher": teacher, **students}
    evaluations = {name: evaluate_model(run_dir, r.evaluation, cot, r.data.source, model, teacher, data)
                   for name, model in models.items()}
    deployment = measure_deployment(run_dir, models, r.evaluation.deployment, cot, data, r.evaluation.split)
    benchmarks = run_lm_eval(run_dir, models, r.evaluation.lm_eval)
    judged = (judge_students(run_dir, r.evaluation.judge, {s.name: evaluations[s.name] for s in r.student_runs()},
                             evaluations["teacher"], data, r.evaluation.split) if r.evaluation.judge else None)
    report = write_report(run_dir, r.run.name, models, evaluations, deployment, benchmarks,
                          {s.name: s.summary() for s in r.student_runs()}, curated, judged)
    if r.run.url:  # the report beside the stage outputs on remote storage (each stage uploads its own)
        push_files(run_dir, ["report.json", "report.md", *report["plots"]], r.run.url)

    print(f"report: {run_dir / 'report.md'}")
    for name, m in {"teacher": report["teacher"], **report["students"]}.items():
        print(f"  {name:>10}: accuracy {m['accuracy']:.3f}, perplexity {m['perplexity']:.3f}, "
              f"{m['params']:,} parameters, {m['latency_ms_per_token']:.2f} ms/token")
    return report


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("recipe", nargs="?", default="recipes/demo.yaml")
    cli.add_argument("--seeds", type=int, nargs="+", help="train and evaluate every student once per seed "
                     "(overrides the recipe's run.seeds)")
    args = cli.parse_args()
    distill(args.recipe, args.seeds)
