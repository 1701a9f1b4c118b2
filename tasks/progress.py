"""A Prefect progress artifact per model being trained (``training-seq-kd``, ``training-teacher``), fed by the
library's ``on_progress(step, total, loss, seconds_left, topk)`` (kdflow/training/progress.py), which knows no Prefect.

Best effort: the artifact is a view of the training, not part of it. A Prefect server that goes away mid-training
made ``update_progress_artifact`` raise ``httpx.ConnectError`` inside a Trainer callback, which failed the student;
one that stops answering would hold each step for the client's timeouts and retries (minutes). So each call runs
in a thread waited for at most ``CALL_TIMEOUT_S``, and the first failure is logged once and ends the updates.
"""

from __future__ import annotations

import contextvars
import os
import re
import threading
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging import get_logger

from kdflow.training.topk_diagnostics import brief
from tasks.artifacts import artifact_key

EVERY_S = 2.0  # artifact updates: often enough to watch, rare enough to cost nothing (one API call each)
# One artifact call: a healthy server answers in milliseconds; this only ends a hang. A machine loaded past what a
# Prefect server answers in 30 s can give it longer (the test suite does: it must not fail because a machine is slow).
CALL_TIMEOUT_S = float(os.environ.get("KDFLOW_ARTIFACT_TIMEOUT_S", "30"))


def training_key(name: str) -> str:
    """``seq-kd@1`` -> ``training-seq-kd-1``: the name's runs of other characters (dashes too) one dash, none at the
    ends."""
    return artifact_key("training", re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model")


def bounded(call, *args, **kwargs):
    """``call(*args, **kwargs)`` in this thread's Prefect context (its settings and client), waited for at most
    ``CALL_TIMEOUT_S``: its value, what it raised, or ``TimeoutError`` (the call goes on in a daemon thread)."""
    context, outcome = contextvars.copy_context(), {}

    def run() -> None:
        try:
            outcome["value"] = context.run(call, *args, **kwargs)
        except BaseException as e:  # carried to the caller, which decides
            outcome["error"] = e

    thread = threading.Thread(target=run, name="progress-artifact", daemon=True)
    thread.start()
    thread.join(CALL_TIMEOUT_S)
    if thread.is_alive():
        raise TimeoutError(f"no answer from the Prefect API within {CALL_TIMEOUT_S:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class TrainingArtifact:
    """Called as ``on_progress``: the artifact shows the percent of steps done, and its description the step,
    the loss, a top-k KD student's diagnostics (teacher kept / tail mass, top-1 outside top-k, KD/CE) and the time
    left, at most every ``EVERY_S`` seconds and always at the last step. Outside a Prefect
    run (a task body called with ``.fn`` in a test) there is no run to attach it to, and no artifact: creating one
    there would start a temporary Prefect server."""

    def __init__(self, stage: str, name: str):
        self.what = f"{stage} {name}"
        self.artifact = None
        self.updated = float("-inf")
        if TaskRunContext.get() or FlowRunContext.get():
            self.artifact = self._call(
                create_progress_artifact,
                progress=0.0,
                key=training_key(name),
                description=f"{self.what}: training steps done",
            )

    def __call__(self, step: int, total: int, loss: float, seconds_left: float, topk: dict | None = None) -> None:
        now = time.perf_counter()
        if self.artifact is None or (now - self.updated < EVERY_S and step < total):
            return
        self.updated = now
        diagnostics = brief(topk or {}).replace("  ", ", ")
        self._call(
            update_progress_artifact,
            self.artifact,
            progress=round(100.0 * step / max(total, 1), 2),
            description=f"{self.what}: step {step}/{total}, loss {loss:.4f}, "
            f"{diagnostics + ', ' if diagnostics else ''}about {seconds_left:.0f} s left",
        )

    def _call(self, call, *args, **kwargs):
        try:
            return bounded(call, *args, **kwargs)
        # Whatever breaks the view (a refused connection, a server error, a timeout, a closed client) must not
        # break the training: say so once and stop updating.
        except Exception as e:  # noqa: BLE001
            self.artifact = None
            get_logger("kdflow.progress").warning(
                f"{self.what}: progress artifact not updated ({type(e).__name__}: {e}); training goes on without it"
            )
            return None
