"""A student's learning curve on a split: the accuracy of each snapshot its training saved (``curve_points``,
kdflow/training/curves.py), against the step and the training wall time at which it was saved. Plain Python: the
curves stage (tasks/curves.py) writes what this returns."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from kdflow.evaluation.quality import accuracy
from kdflow.teacher.hf_generate import load
from kdflow.training.curves import read_curve

CURVE_FILE = "curve.json"  # the curves stage's output: what ``curve_accuracy`` returns


def curve_accuracy(
    student_dir: Path,
    rows: list[dict],
    template: str,
    check: Callable[[str, str], bool],
    max_new_tokens: int,
    batch_size: int,
) -> dict:
    """``{"points": [{step, seconds, model, accuracy, correct}], "max_steps", "resumed_at", "rows"}``: every
    snapshot answers every row greedily, as the evaluate stage's accuracy does."""
    curve = read_curve(student_dir)
    points = []
    for point in curve["points"]:
        net, tokenizer = load(str(Path(student_dir) / point["model"]))
        acc, predictions = accuracy(net, tokenizer, rows, template, check, max_new_tokens, batch_size)
        points.append({**point, "accuracy": acc, "correct": sum(p["correct"] for p in predictions)})
    return {**curve, "points": points, "rows": len(rows)}
