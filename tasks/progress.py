"""A Prefect progress artifact per model being trained (``training-seq-kd``, ``training-teacher``), fed by the
library's ``on_progress(step, total, loss, seconds_left)`` (kdflow/training/progress.py), which knows no Prefect."""

from __future__ import annotations

import re
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext

EVERY_S = 2.0  # artifact updates: often enough to watch, rare enough to cost nothing (one API call each)


def artifact_key(name: str) -> str:
    """Prefect's artifact keys take lowercase letters, digits and dashes only: ``seq-kd@1`` -> ``training-seq-kd-1``."""
    return "training-" + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model")


class TrainingArtifact:
    """Called as ``on_progress``: the artifact shows the percent of steps done, and its description the step,
    the loss and the time left, at most every ``EVERY_S`` seconds and always at the last step. Outside a Prefect
    run (a task body called with ``.fn`` in a test) there is no run to attach it to, and no artifact: creating one
    there would start a temporary Prefect server."""

    def __init__(self, stage: str, name: str):
        self.what = f"{stage} {name}"
        self.artifact = None
        if TaskRunContext.get() or FlowRunContext.get():
            self.artifact = create_progress_artifact(progress=0.0, key=artifact_key(name),
                                                     description=f"{self.what}: training steps done")
        self.updated = float("-inf")

    def __call__(self, step: int, total: int, loss: float, seconds_left: float) -> None:
        now = time.perf_counter()
        if self.artifact is None or (now - self.updated < EVERY_S and step < total):
            return
        self.updated = now
        update_progress_artifact(self.artifact, progress=round(100.0 * step / max(total, 1), 2),
                                 description=f"{self.what}: step {step}/{total}, loss {loss:.4f}, "
                                             f"about {seconds_left:.0f} s left")
