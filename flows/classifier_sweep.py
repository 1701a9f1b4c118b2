"""Classic KD sweep: the student's accuracy against the temperature T, the hard-label weight α and the
teacher ensemble's size, next to the hard-label student, the single teacher and the ensembles. Shares its
teachers and students with ``distill_classifier`` on the same recipe (same content, same cache keys).

    python -m flows.classifier_sweep recipes/classifier-digits.yaml
"""

from __future__ import annotations

from prefect import flow

from flows.cli import run_as_script
from kdflow.config.classic import DistillSection, load_classifier_recipe
from kdflow.config.loading import RecipeError
from tasks.classifier import (
    SweepPoint,
    SweepSeed,
    classifier_data,
    score_ensemble,
    train_classifier_student,
    train_classifier_teacher,
    write_sweep_report,
)


@flow(name="classifier-sweep", log_prints=True)
def classifier_sweep(recipe: str = "recipes/classifier-digits.yaml") -> dict:
    r = load_classifier_recipe(recipe)
    if r.sweep is None:
        raise RecipeError(f"{recipe}: no `sweep` section: add temperatures, alphas and ensemble_sizes to sweep over")
    run_dir, sweep = r.run_dir, r.sweep

    data = classifier_data(run_dir, r.data)
    seeds, points = [], []
    for seed in r.seeds:
        members = [train_classifier_teacher(run_dir, r.teacher.model, data, s) for s in r.member_seeds(seed)]
        hard = train_classifier_student(run_dir, r.student.model, data, [], None, seed)
        ensembles = {k: score_ensemble(data, members[:k]) for k in sweep.ensemble_sizes}
        seeds.append(SweepSeed(seed=seed, members=members, ensembles=ensembles, hard=hard))
        for k in sweep.ensemble_sizes:
            for alpha in sweep.alphas:
                for t in sweep.temperatures:
                    student = train_classifier_student(
                        run_dir, r.student.model, data, members[:k], DistillSection(temperature=t, alpha=alpha), seed
                    )
                    points.append(SweepPoint(seed=seed, ensemble=k, alpha=alpha, temperature=t, student=student))
    report = write_sweep_report(run_dir, r.run.name, data, seeds, points)

    print(f"sweep report: {run_dir / 'sweep-report.md'}")
    for best in report["best_on_val"]:
        print(
            f"  best on val: ensemble {best['ensemble']}, alpha {best['alpha']}, T {best['temperature']}: "
            f"test accuracy {100 * best['test_accuracy']['mean']:.2f} ± {100 * best['test_accuracy']['std']:.2f} %"
        )
    return report


if __name__ == "__main__":
    run_as_script("classifier-sweep")  # the same arguments and --help as `kdflow classifier-sweep`
