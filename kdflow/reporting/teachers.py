"""The report's section on several routed teachers: each teacher's own figures on the test rows routed to it (and on
all of them, to show what routing buys), the routed teachers' figure as one teacher (each test row answered by its
routed teacher: what the students are measured against), and each teacher's share of the answers' and the logit
cache's tokens."""

from __future__ import annotations

from kdflow.config.teachers import Routing


def routed_figures(
    routing: Routing,
    test_rows: list[dict],
    predictions: dict[str, list[dict]],
    answers: dict | None = None,
    logits: dict | None = None,
    kept: dict[str, int] | None = None,
) -> dict:
    """``test_rows``: the evaluation split's rows; ``predictions``: each teacher's evaluate-stage predictions on all of
    them (``id``, ``correct``); ``answers``, ``logits``: the joined generate and logit-cache manifests (their
    ``by_teacher`` and ``token_share``); ``kept``: each teacher's kept answers. Returns the report's ``teachers``."""
    # Free text (no answer checker) has no per-row verdict: its figures per teacher are its own report rows.
    checked = all(rows and "correct" in rows[0] for rows in predictions.values())
    correct = {name: {p["id"]: bool(p.get("correct")) for p in rows} for name, rows in predictions.items()}
    mine = {name: [r["id"] for r in test_rows if routing.teacher_of(r) == name] for name in predictions}

    def accuracy(name: str, ids: list[str]) -> float | None:
        return round(sum(correct[name][i] for i in ids) / len(ids), 4) if ids and checked else None

    every = [r["id"] for r in test_rows]
    teachers = {
        name: {
            "test_rows": len(ids),
            "accuracy_own_rows": accuracy(name, ids),
            "accuracy_other_rows": accuracy(name, [i for i in every if i not in set(ids)]),
            "accuracy_all_rows": accuracy(name, every),
            "answers": (answers or {}).get("by_teacher", {}).get(name, {}).get("rows"),
            "kept": (kept or {}).get(name),
            "answer_token_share": (answers or {}).get("token_share", {}).get(name),
            "logit_positions": (logits or {}).get("by_teacher", {}).get(name, {}).get("positions"),
            "logit_token_share": (logits or {}).get("token_share", {}).get(name),
        }
        for name, ids in mine.items()
    }
    routed = sum(correct[routing.teacher_of(r)][r["id"]] for r in test_rows) / max(len(test_rows), 1)
    return {
        "routing": routing.model_dump(),
        "routed_accuracy": round(routed, 4) if checked else None,
        "by_teacher": teachers,
    }


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def teachers_markdown(figures: dict | None, students: dict[str, dict] | None = None) -> str:
    """The report's "Teachers" section ('' without several teachers); ``students``: the report's, whose on-policy
    students each add the share of their sampled tokens each teacher scored."""
    if not figures:
        return ""
    r = figures["routing"]
    rule = f"`{r['column']}`" + (f" (count of `{r['count']}`)" if r.get("count") else "")
    routes = ", ".join(f"{k} → {v}" for k, v in r["routes"].items())
    lines = [
        "",
        "## Teachers",
        "",
        f"Each row goes to the teacher its {rule} routes it to ({routes + '; ' if routes else ''}"
        f"otherwise {r['default']})."
        + (
            f" The routed teachers together, each test row answered by its own: **{_pct(figures['routed_accuracy'])}**"
            " (the teacher accuracy students are measured against above)."
            if figures["routed_accuracy"] is not None
            else ""
        ),
        "",
        "| teacher | test rows routed | accuracy, own rows | accuracy, other rows | answers | kept | "
        "answer-token share | logit positions | logit-token share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in figures["by_teacher"].items():
        cells = [
            name,
            t["test_rows"],
            _pct(t["accuracy_own_rows"]),
            _pct(t["accuracy_other_rows"]),
            "–" if t["answers"] is None else f"{t['answers']:,}",
            "–" if t["kept"] is None else f"{t['kept']:,}",
            _pct(t["answer_token_share"]),
            "–" if t["logit_positions"] is None else f"{t['logit_positions']:,}",
            _pct(t["logit_token_share"]),
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines + scoring_lines(students or {})) + "\n"


def scoring_lines(students: dict[str, dict]) -> list[str]:
    """Per on-policy student, each routed teacher's share of the sampled tokens it scored."""
    lines = []
    for name, s in students.items():
        by_teacher = (s.get("on_policy") or {}).get("by_teacher")
        if by_teacher:
            shares = ", ".join(
                f"{teacher} {_pct(n['token_share'])} ({n['tokens']:,} tokens of {n['samples']:,} samples)"
                for teacher, n in by_teacher.items()
            )
            lines.append(f"On-policy student {name}: its samples scored by {shares}.")
    return ["", *lines] if lines else []
