"""One student of a recipe, trained outside Prefect on a run folder — in this process, or in every process
``accelerate launch`` starts (no Prefect server is started or asked):

    python -m flows.train_one --recipe recipes/demo.yaml --student seq-kd [--run-dir runs/demo] --out OUT
    accelerate launch --config_file accelerate/multi_gpu.yaml --num_processes 8 \\
        -m flows.train_one --recipe R --student NAME --out OUT

The inputs are the run folder's outputs that the recipe's settings key, as the students stage's rerun alone finds
them (flows/lookups.py), not the newest of each stage: after an edit and its revert, the newest is the edited recipe's.
Then it trains exactly as the students stage does (``kdflow.training.cli.train_job``), writing ``OUT/model``,
``OUT/log_history.json`` and, for LoRA, ``OUT/adapter``; the main process alone writes them. ``--student`` is a name
from the recipe, or ``<name>@<seed>`` where the recipe sets ``run.seeds``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.lookups import found
from flows.train_students import inputs_from_run
from kdflow.config.recipe import load_recipe
from kdflow.config.student import PrunedInit, StudentInit
from kdflow.store.model_folders import model_location
from kdflow.training.cli import launched
from kdflow.training.student import StudentJob, needs_routed_teachers
from tasks.models import PRUNE


def student_job(recipe: str, student: str, run_dir: str | None = None, checkpoints: str | None = None) -> StudentJob:
    """A ``StudentJob`` for the recipe's student ``student`` on the run folder's outputs the recipe keys."""
    r = load_recipe(recipe)
    sections = {s.name: s for s in r.student_runs()}
    if student not in sections:
        raise SystemExit(f"no student {student!r} in {recipe}; its students are {sorted(sections)}")
    section = sections[student]
    if r.teachers and needs_routed_teachers(section):  # each teacher scores in a process the students stage starts
        raise SystemExit(
            f"student {student!r} is scored on-policy by {len(r.teachers)} routed teachers: train it with "
            f"`kdflow students {recipe}` (or `kdflow distill`), which hands it each one"
        )
    run = Path(run_dir) if run_dir else r.run_dir
    if isinstance(section.init, StudentInit):  # its start is another student's trained model, found by that one's key
        raise SystemExit(
            f"student {student!r} starts from the trained student {section.init.student!r}: train both with "
            f"`kdflow students {recipe}` (or `kdflow distill`), which hands it that model"
        )
    data, teacher, curated, logits = inputs_from_run(run, r, [section])  # the students stage's own lookup
    if isinstance(section.init, PrunedInit):  # the teacher pruned once by the prune stage: its model folder
        pruned = found(run, PRUNE, init=section.init, teacher=teacher, data=data, template=r.prompts.cot_text())
        section = section.model_copy(update={"model": model_location(pruned), "init": None})
    return StudentJob(
        section=section,
        template=r.prompts.cot_text(),
        teacher=teacher,
        data=data,
        curated=curated,
        logits=logits,
        checkpoints=checkpoints,
    )


def main(argv: list[str] | None = None) -> None:
    launched(run, argv)  # each rank's exception in the launcher's summary


def run(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.train_one", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="the recipe YAML")
    parser.add_argument("--student", required=True, help="the student's name in the recipe (<name>@<seed> with seeds)")
    parser.add_argument("--run-dir", help="run folder to take the inputs from (default: the recipe's)")
    parser.add_argument("--out", required=True, help="folder to write model/, log_history.json (and adapter/) to")
    parser.add_argument("--checkpoints", help="a folder to checkpoint into and resume from (default: none)")
    args = parser.parse_args(argv)
    from kdflow.training.cli import train_job  # late: torch and TRL take seconds

    train_job(student_job(args.recipe, args.student, args.run_dir, args.checkpoints), Path(args.out))


if __name__ == "__main__":
    main()
