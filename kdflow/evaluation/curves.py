"""A student's learning curve on a split: the quality of each snapshot its training saved (``curve_points``,
kdflow/training/curves.py), against the step and the training wall time at which it was saved. Each snapshot is
scored with the figure the evaluate stage records for that data, by the same code: accuracy through the answer
checker, or on instruction data ROUGE-L against the references (kdflow/evaluation/free_text.py). Plain Python: the
curves stage (tasks/curves.py) writes what this returns."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from kdflow.config.precision import Dtype
from kdflow.evaluation.free_text import greedy_rouge_l
from kdflow.evaluation.quality import accuracy
from kdflow.teacher.hf_generate import load
from kdflow.training.curves import read_curve

CURVE_FILE = "curve.json"  # the curves stage's output: what ``curve_quality`` returns


def snapshot_quality(
    net, tokenizer, rows: list[dict], template: str, metric: str, check: Callable, max_new_tokens: int, batch_size: int
) -> dict:
    """``{metric: value}`` of one snapshot's greedy answers, with ``correct`` (rows right) for accuracy. ``metric``:
    ``accuracy`` (through ``check``) or ``rouge_l`` (free text: ``check`` is never called)."""
    if metric == "rouge_l":
        return {"rouge_l": greedy_rouge_l(net, tokenizer, rows, template, max_new_tokens, batch_size)[0]}
    if metric != "accuracy":
        raise ValueError(f"no learning curve of {metric!r}: accuracy or rouge_l")
    acc, predictions = accuracy(net, tokenizer, rows, template, check, max_new_tokens, batch_size)
    return {"accuracy": acc, "correct": sum(p["correct"] for p in predictions)}


def curve_quality(
    student_dir: Path,
    rows: list[dict],
    template: str,
    metric: str,
    check: Callable,
    max_new_tokens: int,
    batch_size: int,
    dtype: Dtype | None = None,
) -> dict:
    """``{"points": [{step, seconds, model, <metric>, ...}], "max_steps", "resumed_at", "rows"}``: every snapshot,
    loaded in ``dtype`` as the evaluate stage loads the finished student, answers every row greedily
    (``snapshot_quality``)."""
    curve = read_curve(student_dir)
    points = []
    for point in curve["points"]:
        net, tokenizer = load(str(Path(student_dir) / point["model"]), dtype)
        points.append(
            {**point, **snapshot_quality(net, tokenizer, rows, template, metric, check, max_new_tokens, batch_size)}
        )
    return {**curve, "points": points, "rows": len(rows)}
