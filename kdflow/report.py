"""The run report: teacher and students side by side, as JSON (for machines) and Markdown (for people)."""

from __future__ import annotations


def build_report(run_name: str, teacher: dict, students: dict[str, dict], curation: dict) -> dict:
    """``teacher`` and each student: metrics with at least accuracy and params."""
    return {
        "run": run_name,
        "teacher": teacher,
        "students": {
            name: {**m, "compression": round(teacher["params"] / m["params"], 1)} for name, m in students.items()
        },
        "curation": curation,
    }


def render_markdown(report: dict) -> str:
    t = report["teacher"]
    lines = [
        f"# kdflow report: {report['run']}",
        "",
        f"Evaluated on the `{t['split']}` split ({t['rows']} questions), greedy chain-of-thought, exact final answer.",
        "",
        "| model | data | accuracy | parameters | teacher / student size |",
        "|---|---|---:|---:|---:|",
        f"| teacher | gold | {t['accuracy']:.3f} | {t['params']:,} | 1.0× |",
    ]
    for name, s in report["students"].items():
        lines.append(f"| {name} | {s['data']} | {s['accuracy']:.3f} | {s['params']:,} | {s['compression']}× |")
    c = report["curation"]
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(c["drop_reasons"].items())) or "none"
    lines += [
        "",
        f"Teacher answers: {c['input_rows']} generated, {c['kept']} kept, {c['dropped']} dropped ({reasons}).",
        "",
    ]
    return "\n".join(lines)
