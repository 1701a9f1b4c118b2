"""Train one student outside Prefect, from a job file — in this process, or in every process ``accelerate launch``
starts:

    python -m kdflow.training.cli --job JOB --out OUT
    accelerate launch --config_file accelerate/multi_gpu.yaml --num_processes 8 \\
        -m kdflow.training.cli --job JOB --out OUT

A job (``kdflow.training.student.StudentJob``) holds the student's section and the exact inputs it trains on; this
trains exactly as the students stage does (``kdflow.training.student.train_here``), writing ``OUT/model`` (a plain
causal LM; LoRA merged), ``OUT/log_history.json`` and, for LoRA, ``OUT/adapter``. Under ``accelerate launch`` the main
process alone writes them.

The students stage starts this module itself for a student with ``launch:``, with a job file of the inputs it keyed the
student on. For a recipe's student on a run folder, ``python -m flows.train_one`` finds those inputs by the recipe's
keys (a lookup that needs the stages' definitions, above the library) and then trains here. The output folder is not a
stage output (no manifest); the stage makes that.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes: from the process group DDP formed, once it exists
    (so a log line shows it really did), else from the launcher's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def main(argv: list[str] | None = None) -> None:
    launched(run, argv)


def launched(entry, argv: list[str] | None) -> None:
    """``entry(argv)`` as a command ``accelerate launch`` may start. torchrun (its multi-process launcher) ends its
    output with a summary of failed ranks; under @record that summary carries each rank's exception, so the last
    lines of a failed launch name the cause."""
    from torch.distributed.elastic.multiprocessing.errors import record

    record(entry)(argv)


def run(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdflow.training.cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", required=True, help="a job file (written by the students stage)")
    parser.add_argument("--out", required=True, help="folder to write model/, log_history.json (and adapter/) to")
    args = parser.parse_args(argv)
    from kdflow.training.student import StudentJob  # late: torch and TRL take seconds

    train_job(StudentJob.read(args.job), Path(args.out))


def train_job(job, out: Path) -> None:
    """Train ``job`` (a ``StudentJob``) into ``out``, every launched process taking part; rank 0 writes."""
    from kdflow.training.student import student_rows, train_here

    rows = student_rows(job.section, job.template, job.data, job.curated, logits=job.logits)
    if not rows:
        raise SystemExit(f"student {job.section.name!r} has no training rows")
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
