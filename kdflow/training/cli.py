"""Train one student outside Prefect — in this process, or in every process ``accelerate launch`` starts:

    python -m kdflow.training.cli --recipe recipes/demo.yaml --student seq-kd --run-dir runs/demo --out OUT
    accelerate launch --config_file accelerate/multi_gpu.yaml --num_processes 8 \\
        -m kdflow.training.cli --recipe R --student NAME --run-dir D --out OUT

takes the run's finished inputs from its run folder (the output of each stage the student needs that the recipe's
settings key, as ``flows/train_students.py`` does) and trains exactly as the students stage does
(``kdflow.training.student.train_here``), writing ``OUT/model`` (a plain causal LM; LoRA merged),
``OUT/log_history.json`` and, for LoRA, ``OUT/adapter``. Under ``accelerate launch`` the main process alone writes them.
``--student`` is a name from the recipe, or ``<name>@<seed>`` where the recipe sets ``run.seeds``.

The students stage starts this module itself for a student with ``launch:``, with ``--job``: a file holding the
section and the exact inputs the stage keyed the student on. The output folder is not a stage output (no
manifest); the stage makes that.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def job_from_run(recipe: str, student: str, run_dir: str | None, checkpoints: str | None):
    """A ``StudentJob`` for the recipe's student ``student`` on the run folder's outputs the recipe keys."""
    from kdflow.config.recipe import load_recipe
    from kdflow.config.student import StudentData
    from kdflow.training.student import (
        StudentJob,
        needs_logit_cache,
        needs_routed_teachers,
        trains_on_imported_rows,
    )

    r = load_recipe(recipe)
    sections = {s.name: s for s in r.student_runs()}
    if student not in sections:
        raise SystemExit(f"no student {student!r} in {recipe}; its students are {sorted(sections)}")
    section = sections[student]
    if r.teachers and needs_routed_teachers(section):  # each teacher's output is found by its stage's key, in Prefect
        raise SystemExit(
            f"student {student!r} is scored on-policy by {len(r.teachers)} routed teachers: train it with "
            f"`kdflow students {recipe}` (or `kdflow distill`), which hands it each one"
        )
    run = Path(run_dir) if run_dir else r.run_dir
    # Each input the one the recipe keys, as the stage flows find them, not the newest of its stage: after an edit and
    # its revert the newest is the edited recipe's. (flows/ is imported here, in a command, not by the library.)
    from flows.chain import found_upstream, run_teacher

    teacher = run_teacher(run, r)
    logits = found_upstream(run, r, teacher, curated=False, logits=needs_logit_cache(section)).logits
    answers = section.data is StudentData.teacher and not trains_on_imported_rows(section, logits)
    up = found_upstream(run, r, teacher, curated=answers, logits=False)
    return StudentJob(
        section=section,
        template=r.prompts.cot_text(),
        teacher=teacher,
        data=up.data,
        curated=up.curated,
        logits=logits,
        checkpoints=checkpoints,
    )


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes: from the process group DDP formed, once it exists
    (so a log line shows it really did), else from the launcher's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def main(argv: list[str] | None = None) -> None:
    # torchrun (accelerate's multi-process launcher) ends its output with a summary of failed ranks; under
    # @record that summary carries each rank's exception, so the last lines of a failed launch name the cause.
    from torch.distributed.elastic.multiprocessing.errors import record

    record(run)(argv)


def run(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdflow.training.cli", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--recipe", help="the recipe YAML (with --student)")
    source.add_argument("--job", help="a job file written by the students stage")
    parser.add_argument("--student", help="the student's name in the recipe")
    parser.add_argument("--run-dir", help="run folder to take the inputs from (default: the recipe's)")
    parser.add_argument("--out", required=True, help="folder to write model/, log_history.json (and adapter/) to")
    parser.add_argument("--checkpoints", help="a folder to checkpoint into and resume from (default: none)")
    args = parser.parse_args(argv)
    if args.recipe and not args.student:
        parser.error("--recipe needs --student NAME")
    if args.job and (args.student or args.run_dir or args.checkpoints):
        parser.error("--job carries the student, its inputs and its checkpoint folder; drop the other options")

    from kdflow.training.student import StudentJob, student_rows, train_here  # late: torch and TRL take seconds

    job = (
        StudentJob.read(args.job)
        if args.job
        else job_from_run(args.recipe, args.student, args.run_dir, args.checkpoints)
    )
    rows = student_rows(job.section, job.template, job.data, job.curated, logits=job.logits)
    if not rows:
        raise SystemExit(f"student {job.section.name!r} has no training rows")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = rank_and_world()
    print(f"[rank {rank}/{world}] training {job.section.name!r} on {len(rows)} rows", flush=True)
    train_here(job.section, rows, job.teacher, job.logits, out, Path(job.checkpoints) if job.checkpoints else None)
    rank, world = rank_and_world()
    print(
        f"[rank {rank}/{world}] done: " + ("wrote " + str(out / "model") if rank == 0 else "rank 0 writes the model"),
        flush=True,
    )


if __name__ == "__main__":
    main()
