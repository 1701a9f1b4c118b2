"""The report's "Teacher preflight" section: what the preflight stage found before the teacher answered
(kdflow/evaluation/preflight.py writes each teacher's ``preflight.json``), so a reader of the results sees what was
checked against what the recipe relies on, and what was skipped and why."""

from __future__ import annotations


def preflight_markdown(reports: dict[str, dict] | None) -> str:
    """``reports``: each teacher's preflight.json by teacher name ("teacher" for the only one); '' when no preflight
    ran in this flow (``kdflow evaluate`` on a run folder that has none)."""
    if not reports:
        return ""
    lines = [
        "",
        "## Teacher preflight",
        "",
        "Checked before the teacher answered (the `preflight` stage; a failed check stops the run there).",
        "",
        "| teacher | check | status | what was seen / why |",
        "|---|---|---|---|",
    ]
    for name, report in reports.items():
        for check in report["checks"]:
            detail = str(check["detail"]).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {name} | {check['name']} | {check['status']} | {detail} |")
    return "\n".join(lines) + "\n"


def preflight_summary(reports: dict[str, dict] | None) -> dict | None:
    """What report.json keeps: per teacher whether every check passed and the counts, with the checks themselves."""
    if not reports:
        return None
    return {name: {k: r[k] for k in ("passed", "counts", "checks")} for name, r in reports.items()}
