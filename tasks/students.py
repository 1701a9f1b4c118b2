"""Stage 4: students, trained with TRL: the baseline on gold rationales, seq-KD on the teacher's kept answers
(which also cover questions the gold set does not), and white-box KD students on the same answers — from
the logit cache (offline), with the live teacher (online GKD), or on its hidden states (feature KD).

Training checkpoints go to a work folder named by the stage's key, outside the temporary output folder, so
a rerun after a crash or a kill resumes from the last checkpoint instead of starting over. The trained model waits
there too (``kdflow.training.trained``) until the output holding it is complete: a failure after training (the
manifest's figures) reruns without training again. The work folder goes once the output is in place.

A student whose section has ``launch:`` trains in processes of its own, started by ``accelerate launch``
(``kdflow/training/cli.py``, which runs ``kdflow.training.student.train_here`` in each process), e.g. DDP over a node's
GPUs.

With several routed teachers an on-policy student is handed all of them (``routed``): each scores the student's
samples of the rows routed to it, so the teachers and the routing are in its key (``needs_routed_teachers``); every
other student reads their joined answers and logit cache, whose keys hold them already."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from prefect import task

from kdflow.config.student import StudentSection
from kdflow.store.model_folders import MODEL, SOURCE, keyed_by_content, write_location
from kdflow.store.outputs import OutputRef, exclusive
from kdflow.store.stage import Stage
from kdflow.teacher.routing import RoutedTeachers
from kdflow.training.student import (
    StudentJob,
    launch_student,
    needs_logit_cache,
    on_policy_accounting,
    saved_params,
    student_rows,
    topk_summary,
    train_here,
)
from kdflow.training.trained import TRAINED, fresh, link_tree, seal, sealed
from tasks.caching import STAGE_RESULTS, StageCache
from tasks.progress import TrainingArtifact

# A pretrained student's local folder is keyed by its files (model_folders.keyed_by_content): new weights at the same
# path retrain it; one inside a stage output (a pruned teacher, another student) keeps the key its path gives.
# ``routed`` (several teachers scoring an on-policy student's samples) is in the key only where given, so that every
# other student keeps its key.
STUDENTS = Stage(
    "students",
    "1",
    lambda section, template, teacher, data, curated, logits=None, routed=None: {
        "section": keyed_by_content(section),
        "template": template,
        "teacher": teacher,
        "data": data,
        "curated": curated,
        "logits": logits,
        **({"routing": routed.routing, "teachers": routed.teachers} if routed is not None else {}),
    },
    files=(SOURCE, f"{MODEL}/"),
)


@task(cache_policy=StageCache(STUDENTS), **STAGE_RESULTS, task_run_name="train_student[{section.name}]")
def train_student(
    run_dir: Path,
    section: StudentSection,
    template: str,
    teacher: OutputRef,
    data: OutputRef,
    curated: OutputRef | None,
    logits: OutputRef | None = None,
    routed: RoutedTeachers | None = None,
) -> OutputRef:
    """``curated`` is None for a gold-only student, so that a new filter does not retrain the baseline;
    ``logits`` (the logit cache) is passed to offline-KD students only; ``routed`` (several teachers and their
    routing) to on-policy students of several teachers only."""
    inputs = dict(section=section, template=template, teacher=teacher, data=data, curated=curated, logits=logits)
    out = STUDENTS.output(run_dir, **inputs, routed=routed)
    if done := out.done:
        return done
    if needs_logit_cache(section) and logits is None:
        raise ValueError(f"student {section.name!r} trains from the logit cache: pass the logit-cache stage's output")
    if routed is not None and section.launch is not None:  # the recipe refuses it: a launch needs one served teacher
        raise ValueError(f"student {section.name!r}: a launched student cannot be scored by several routed teachers")
    rows = student_rows(section, template, data, curated, routed.routing if routed is not None else None, logits)
    if not rows:
        raise ValueError(f"student {section.name!r} has no training rows: the filter kept no teacher answers")
    stage_dir, checkpoints = Path(run_dir) / STUDENTS.name, out.work
    with exclusive(run_dir, STUDENTS.name, out.key):
        if done := out.done:
            return done  # a concurrent run of the same student finished it while this one waited
        with out.building() as tmp:
            if (trained := sealed(checkpoints)) is None:
                start, part = time.perf_counter(), fresh(checkpoints)
                if section.launch is None:  # progress lines in the terminal, and the artifact training-<student>
                    progress = TrainingArtifact(STUDENTS.name, section.name)
                    train_here(section, rows, teacher, logits, part, checkpoints, progress, routed)
                else:  # the job file and the log stay beside the lock file, hidden from the run folder's readers
                    job = StudentJob(
                        **inputs, checkpoints=str(checkpoints)
                    )  # the keyed inputs (a launch has one teacher)
                    launch = f".launch-{out.key[:16]}"
                    launch_student(job, part, stage_dir / f"{launch}.json", stage_dir / f"{launch}.log")
                trained = seal(checkpoints, seconds=round(time.perf_counter() - start, 1))
            link_tree(checkpoints / TRAINED, tmp)
            write_location(tmp, MODEL)
            out.finish(
                tmp,
                rows=len(rows),
                name=section.name,
                params=saved_params(tmp / MODEL),
                seconds=trained["seconds"],  # training's, in the attempt that trained it
                **on_policy_accounting(tmp),
                **topk_summary(tmp, section),
            )
        shutil.rmtree(checkpoints, ignore_errors=True)  # only now that the output is in place
    return out.ref()
