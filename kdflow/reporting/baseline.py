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


def baseline_student(
    students: dict[str, dict], seed: int | None = None, start=ANY_START, trained_as: dict | None = None
) -> str | None:
    """The SFT baseline (``is_baseline``) among ``students``; with ``seed``, one trained with that seed (each student
    is compared with its own seed's); with ``start`` (``start_of``), one of those starting weights — a pruned KD
    student is measured against a pruned baseline, a fresh one against one of its own size, one fine-tuned from a
    pretrained model against that model's. Of several, the first trained as ``trained_as`` is (the same training
    settings, then at least LoRA or not alike), else the first listed."""
    found = [
        name
        for name, s in students.items()
        if is_baseline(s) and (seed is None or s.get("seed") == seed) and (start is ANY_START or start_key(s) == start)
    ]
    if trained_as is None or not found:
        return found[0] if found else None

    def likeness(name: str) -> tuple[bool, bool]:
        s = students[name]
        return s.get("training_digest") == trained_as.get("training_digest"), s.get("lora_r") == trained_as.get(
            "lora_r"
        )

    return max(found, key=likeness)  # max keeps the first of equals: the order of the recipe


def start_key(m: dict) -> tuple:
    """A student's starting weights as its record says: the pruned or chained ``init``, the pretrained model or the
    fresh architecture (``start``) — and for a fresh one its seed, which draws those weights
    (kdflow/training/student.py builds it with the section's seed); a pruned or pretrained start is the same whatever
    the seed."""
    start = m.get("start")
    fresh = isinstance(start, str) and start.startswith("fresh ")
    return m.get("init"), start, m.get("seed") if fresh else None


def start_of(students: dict[str, dict], name: str) -> tuple:
    """What ``students[name]`` started from, for ``baseline_student``'s ``start``: its ``start_key``, or, for one
    started from another student (``starts_from``, with ``run.seeds`` the one of its seed), that student's start, and
    so on to the first."""
    m, seen = students[name], {name}
    while m.get("starts_from"):
        parent = next((p for p in (f"{m['starts_from']}@{m.get('seed')}", m["starts_from"]) if p in students), None)
        if parent is None or parent in seen:
            break
        seen.add(parent)
        m = students[parent]
    return start_key(m)
