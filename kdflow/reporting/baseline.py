"""What each student is measured against: the SFT baseline (the same start trained on gold data alone), and the share
of the teacher's lead over it that the student closed. A student's baseline must differ from it only by the teacher's
signal — same starting weights, same seed, all of the gold data — or the gap closed measures something else."""

from __future__ import annotations


def gap_closure(student: float, baseline: float, teacher: float) -> float | None:
    """(student − baseline) / (teacher − baseline): 0 = no better than the baseline, 1 = as good as the
    teacher; None when the teacher is no better than the baseline (no gap to close) or not evaluated (imported)."""
    if teacher is None or teacher <= baseline:
        return None
    return (student - baseline) / (teacher - baseline)


def is_baseline(m: dict) -> bool:
    """Gold data only, all of it, no KD, not started from another student's weights (which carry what that one
    learnt), not a quantized copy: an SFT baseline."""
    return (
        m.get("data") == "gold"
        and m.get("kd") is None
        and not m.get("quantized")
        and not m.get("starts_from")
        and m.get("data_fraction", 1.0) >= 1.0
    )


ANY_START = object()


def baseline_student(students: dict[str, dict], seed: int | None = None, start=ANY_START) -> str | None:
    """The first SFT baseline (``is_baseline``) among ``students``; with ``seed``, one trained with that seed (each
    student is compared with its own seed's); with ``start``, one of that start (``init``: the pruned teacher a student
    was cut from; None for a fresh architecture or a pretrained model), so that a pruned KD student is measured against
    a pruned baseline and a fresh one against a fresh one."""
    return next(
        (
            name
            for name, s in students.items()
            if is_baseline(s)
            and (seed is None or s.get("seed") == seed)
            and (start is ANY_START or s.get("init") == start)
        ),
        None,
    )


def start_of(students: dict[str, dict], name: str):
    """What ``students[name]`` started from, for ``baseline_student``'s ``start``: its ``init`` (None for a fresh
    architecture or a pretrained model), or, for one started from another student (``starts_from``, with ``run.seeds``
    the one of its seed), that student's start, and so on to the first."""
    m, seen = students[name], {name}
    while m.get("starts_from"):
        parent = next((p for p in (f"{m['starts_from']}@{m.get('seed')}", m["starts_from"]) if p in students), None)
        if parent is None or parent in seen:
            break
        seen.add(parent)
        m = students[parent]
    return m.get("init")
