"""Classic KD (Hinton et al. 2015), top to bottom: data → teacher ensemble → hard-label student and
distilled student → report, once per seed. Every stage is a content-cached task.

    python -m flows.distill_classifier recipes/classifier-digits.yaml
"""

from __future__ import annotations

from prefect import flow

from flows.cli import run_as_script
from kdflow.config.classic import load_classifier_recipe
from kdflow.reporting.run_report import REPORT_MD
from tasks.classifier import (
    SeedRun,
    classifier_data,
    score_ensemble,
    train_classifier_student,
    train_classifier_teacher,
    write_classifier_report,
)


@flow(name="distill-classifier", log_prints=True)
def distill_classifier(recipe: str = "recipes/classifier-digits.yaml") -> dict:
    r = load_classifier_recipe(recipe)  # a bad recipe fails here, before any work
    run_dir = r.run_dir

    data = classifier_data(run_dir, r.data)
    runs = []
    for seed in r.seeds:
        members = [train_classifier_teacher(run_dir, r.teacher.model, data, s) for s in r.member_seeds(seed)]
        hard = train_classifier_student(run_dir, r.student.model, data, [], None, seed)
        kd = train_classifier_student(run_dir, r.student.model, data, members, r.distill, seed)
        run = SeedRun(seed=seed, members=members, ensemble=score_ensemble(data, members), hard=hard, kd=kd)
        if r.omitted_class:  # Hinton's §3: both students again, on a transfer set without that class
            c = r.omitted_class.label
            run.hard_omitted = train_classifier_student(run_dir, r.student.model, data, [], None, seed, c)
            run.kd_omitted = train_classifier_student(run_dir, r.student.model, data, members, r.distill, seed, c)
        runs.append(run)
    report = write_classifier_report(run_dir, r.run.name, data, r.distill, runs, r.omitted_class)

    print(f"report: {run_dir / REPORT_MD}")
    for name, m in report["models"].items():
        acc, err = m["test_accuracy"], m["test_errors"]
        print(
            f"  {name:>20}: test accuracy {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} %, "
            f"errors {err['values']}, {m['params']:,} parameters"
        )
    if omitted_class := report.get("omitted_class"):
        c = omitted_class["label"]
        for name, s in omitted_class["students"].items():
            print(
                f"  {name} without {c}s: test {c}s right {100 * s['class_accuracy']['mean']:.1f} %, "
                f"{100 * s['class_accuracy_raised']['mean']:.1f} % with its bias for {c} raised "
                f"by {s['bias']['mean']:.2f} (chosen on val)"
            )
    return report


if __name__ == "__main__":
    run_as_script("classifier")  # the same arguments and --help as `kdflow classifier`
