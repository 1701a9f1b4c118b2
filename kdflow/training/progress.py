"""Training progress a person can read: one line per logging step, at most one every few seconds, naming the stage
and the model (``[students seq-kd] step 120/1500  loss 0.5321  2m14s left``), in place of the bare
``{'loss': ..., 'epoch': ...}`` dicts transformers' ``PrinterCallback`` prints (264 of them in a demo log, naming
no model, step count or time left). A caller without Prefect passes ``on_progress(step, total, loss, seconds_left,
topk)``, called on every logging step, e.g. to update a Prefect progress artifact (tasks/students.py); ``topk`` holds
a top-k KD student's diagnostics of the step (``kdflow.training.topk_diagnostics``, also on its line), {} for others."""

from __future__ import annotations

import sys
import time
from typing import Callable

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from kdflow.training import topk_diagnostics

# step, total steps, loss, estimated seconds left, top-k diagnostics ({} without)
OnProgress = Callable[[int, int, float, float, dict], None]
EVERY_S = 5.0  # the terminal gets a line at most this often (and always the first and the last)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class TrainingProgress(TrainerCallback):
    """``stage``: the pipeline stage (``teacher``, ``students``); ``name``: the model being trained.

    Time left is the mean time per step since this run began (a resumed run counts only its own steps) times
    the steps still to do. Only the main process prints (under ``accelerate launch`` every rank would)."""

    def __init__(self, stage: str, name: str, on_progress: OnProgress | None = None, every_s: float = EVERY_S):
        self.label, self.on_progress, self.every_s = f"[{stage} {name}]", on_progress, every_s
        self.started = self.first_step = None
        self.printed = float("-inf")

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs, step, total = logs or {}, state.global_step, state.max_steps
        if "loss" in logs:
            elapsed = time.perf_counter() - self.started
            left = elapsed / max(step - self.first_step, 1) * (total - step)
            topk = topk_diagnostics.of(logs)
            if self.on_progress is not None:
                self.on_progress(step, total, float(logs["loss"]), left, topk)
            now = time.perf_counter()
            if state.is_world_process_zero and (now - self.printed >= self.every_s or step >= total):
                self.printed = now
                brief = topk_diagnostics.brief(topk)
                self._print(
                    f"step {step}/{total}  loss {logs['loss']:.4f}  {brief + '  ' if brief else ''}"
                    f"{duration(left)} left"
                )
        elif "train_runtime" in logs and state.is_world_process_zero:
            self._print(
                f"done: {step}/{total} steps in {duration(logs['train_runtime'])}, "
                f"mean loss {logs.get('train_loss', float('nan')):.4f}"
            )

    def _print(self, text: str) -> None:
        print(f"{self.label} {text}", file=sys.stdout, flush=True)  # sys.stdout looked up now: pytest swaps it


def report_progress(trainer, stage: str = "training", name: str = "model") -> str:
    """``trainer`` prints the lines of the ``TrainingProgress`` among its callbacks (if it has none, one for
    ``stage`` and ``name``) instead of its own dicts or tqdm bar. Returns its label (``[students seq-kd]``), for
    other messages about this training."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    progress = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TrainingProgress)), None)
    if progress is None:
        progress = TrainingProgress(stage, name)
        trainer.add_callback(progress)
    return progress.label
