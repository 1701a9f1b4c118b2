"""Learning-curve snapshots: a student with ``curve_points: N`` saves its weights at N evenly spaced steps while it
trains, with the training wall time at each, so that accuracy can be read against student steps and against time
(the curves stage, tasks/curves.py, evaluates each snapshot; kdflow/reporting/curves.py draws them).

    students/<key>/curve/curve.json       [{"step": 300, "seconds": 41.2, "model": "curve/step-300"}, ...,
                                           {"step": 1500, "seconds": 203.9, "model": "model"}]
    students/<key>/curve/step-300/        a plain model folder (weights and tokenizer)

The last point is the finished model itself (``model/``), not a copy. ``seconds`` counts training only: the time
spent writing the snapshots is left out, so a curve's clock matches a student trained without one.

Resume: with a work folder (the stage's checkpoint folder, which outlives a crash), snapshots are written there and
linked into the output when training ends, and the training time at every checkpoint is recorded beside them, so a
run resumed from a checkpoint keeps the earlier points and continues their clock from that checkpoint's time (the
time lost between the checkpoint and the crash is not counted). ``resumed_at`` in curve.json names the step. They
stay in the work folder until the stage removes it with its output complete: a run resumed from the last step (a
failure after training) writes the whole curve again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from kdflow.training.trained import link_tree

CURVE = "curve"  # the folder inside a student's output
INDEX = "curve.json"  # in it: the snapshots saved, with their steps and times


def curve_steps(max_steps: int, points: int) -> list[int]:
    """``points`` steps evenly spaced over ``1..max_steps``, the last one ``max_steps``: (1500, 5) -> 300 … 1500."""
    if max_steps < 1 or points < 1:
        raise ValueError(f"need max_steps >= 1 and points >= 1, got {max_steps}, {points}")
    return sorted({max(1, round(max_steps * i / points)) for i in range(1, points + 1)})


class CurveSnapshots(TrainerCallback):
    """Saves the model (and tokenizer) as ``step-<n>`` at each of ``curve_steps(max_steps, points)`` but the last,
    into ``work/curve`` (or ``out_dir/curve`` without a work folder), and writes ``out_dir/curve/curve.json`` when
    training ends, the snapshots linked beside it. Only the main process writes."""

    def __init__(self, out_dir: Path, points: int, tokenizer, work: Path | None = None):
        self.folder, self.points, self.tokenizer = Path(out_dir) / CURVE, points, tokenizer
        self.saving = Path(work) / CURVE if work is not None else self.folder
        self.rows: list[dict] = []
        self.checkpoints: dict[str, float] = {}  # step -> training seconds when that checkpoint was saved
        self.steps: list[int] = []
        self.started = self.base = 0.0
        self.paused = 0.0  # seconds spent writing snapshots, not training
        self.resumed_at: int | None = None

    def elapsed(self) -> float:
        return self.base + time.perf_counter() - self.started - self.paused

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = curve_steps(state.max_steps, self.points)
        self.started, self.paused, self.base = time.perf_counter(), 0.0, 0.0
        self.resumed_at = state.global_step or None
        partial = self.saving / "partial.json"
        if self.resumed_at and partial.is_file():  # points and clock of the attempt that checkpointed
            saved = json.loads(partial.read_text())
            self.checkpoints = saved["checkpoints"]
            self.base = self.checkpoints.get(str(self.resumed_at), 0.0)
            self.rows = [r for r in saved["rows"] if r["step"] <= self.resumed_at]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step not in self.steps:
            return
        seconds = round(self.elapsed(), 2)
        if step == self.steps[-1]:  # the finished model is saved by the trainer's own code (fit)
            self.rows.append({"step": step, "seconds": seconds, "model": "model"})
            return
        if state.is_world_process_zero:
            began = time.perf_counter()
            target = self.saving / f"step-{step}"
            unwrapped = getattr(model, "module", model)  # DDP wraps it
            unwrapped.save_pretrained(target)
            self.tokenizer.save_pretrained(target)
            self.paused += time.perf_counter() - began
        self.rows.append({"step": step, "seconds": seconds, "model": f"{CURVE}/step-{step}"})
        self._save_partial(state)

    def on_save(self, args, state, control, **kwargs):
        self.checkpoints[str(state.global_step)] = round(self.elapsed(), 2)
        self._save_partial(state)

    def _save_partial(self, state) -> None:
        if state.is_world_process_zero:
            self.saving.mkdir(parents=True, exist_ok=True)
            (self.saving / "partial.json").write_text(json.dumps({"rows": self.rows, "checkpoints": self.checkpoints}))

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.saving != self.folder:
            for row in self.rows:
                if row["model"] != "model":
                    name = Path(row["model"]).name
                    link_tree(self.saving / name, self.folder / name)
        else:
            (self.saving / "partial.json").unlink(missing_ok=True)
        index = {"points": self.rows, "max_steps": state.max_steps, "resumed_at": self.resumed_at}
        (self.folder / INDEX).write_text(json.dumps(index, indent=1))


def curve_snapshots(section, out_dir: Path, tokenizer, work: Path | None = None) -> list[TrainerCallback]:
    """The callbacks a student's section asks for: one ``CurveSnapshots`` when ``curve_points`` is set, else none.
    ``work``: the folder that outlives a crash (the stage's checkpoints), where snapshots wait until training ends."""
    return [CurveSnapshots(out_dir, section.curve_points, tokenizer, work)] if section.curve_points else []


def read_curve(student_dir: Path) -> dict:
    """A finished student's ``curve/curve.json``; an error naming the student folder and the fix when it has none."""
    path = Path(student_dir) / CURVE / INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"{student_dir} has no learning curve ({path} is missing): train the student with "
            "`curve_points: N` in its section (a study recipe sets it)"
        )
    return json.loads(path.read_text())
