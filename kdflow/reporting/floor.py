"""The gap a student closed from its starting point, when that point is in the report: a student pruned from the teacher
starts from the pruned copy (the floor, evaluated untrained), so what training bought is measured from there —
``(student − floor) / (teacher − floor)`` on every metric, 0 at the floor and 1 at the teacher whichever direction
the metric improves in. Perplexity is taken on its log (nats per token), where the scale is linear in what a model
assigns."""

from __future__ import annotations

# key in the metrics -> its title in the table; quality comes first (accuracy or ROUGE-L, whichever the run uses)
FLOOR_METRICS = {"kl": "KL(teacher ‖ model)", "agreement": "top-1 agreement", "nll_per_token": "log perplexity"}


def floor_of(students: dict[str, dict]) -> str | None:
    """The untrained pruned copy among the report's models, if there is one."""
    return next((name for name, m in students.items() if m.get("untrained")), None)


def closed(student: float | None, floor: float | None, teacher: float | None) -> float | None:
    """``(student − floor) / (teacher − floor)``; None when a figure is missing or the teacher is the floor."""
    if student is None or floor is None or teacher is None or teacher == floor:
        return None
    return (student - floor) / (teacher - floor)


def floor_gaps(teacher: dict, students: dict[str, dict], quality: str) -> dict | None:
    """{"floor": name, "metrics": [...], "closed": {student: {metric: share}}}; None without a floor."""
    floor = floor_of(students)
    if floor is None:
        return None
    metrics = [quality, *(k for k in FLOOR_METRICS if teacher.get(k) is not None)]
    if "kl" in metrics:  # the teacher's KL from itself is 0 by definition, and measured so
        teacher = {**teacher, "kl": teacher.get("kl", 0.0)}
    gaps = {
        name: {k: closed(m.get(k), students[floor].get(k), teacher.get(k)) for k in metrics}
        for name, m in students.items()
        if name != floor and not m.get("quantized")
    }
    return {"floor": floor, "metrics": metrics, "closed": gaps}


def floor_table(report: dict, quality_title: str) -> list[str]:
    """The Markdown table of ``report["floor_gaps"]``, or nothing."""
    f = report.get("floor_gaps")
    if not f:
        return []
    titles = [quality_title if k == f["metrics"][0] else FLOOR_METRICS[k] for k in f["metrics"]]
    lines = [
        f"Gap closed from the untrained `{f['floor']}` (0) to the teacher (1): (model − floor) / (teacher − floor).",
        "",
        "| student | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(titles),
    ]
    for name, gaps in f["closed"].items():
        lines.append(
            f"| {name} | " + " | ".join("—" if gaps[k] is None else f"{gaps[k]:.2f}" for k in f["metrics"]) + " |"
        )
    return [*lines, ""]
