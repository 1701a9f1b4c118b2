"""Stage 6: report.json + report.md at the top of the run folder, and a Prefect markdown artifact."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from kdflow.outputs import OutputRef
from kdflow.report import build_report, render_markdown


def _write_atomic(path: Path, text: str) -> None:
    part = path.with_name(f".{path.name}.part")
    part.write_text(text)
    os.replace(part, path)


# Cheap and its outputs live outside any stage folder, so it always runs (no cache).
@task
def write_report(run_dir: Path, run_name: str, evaluations: dict[str, OutputRef], students: dict[str, dict],
                 curated: OutputRef) -> dict:
    """``evaluations``: the evaluate stage's output per model ("teacher" and each student by name);
    ``students``: what each student was trained on (its recipe ``data`` field)."""
    metrics = {name: ref.manifest()["metrics"] for name, ref in evaluations.items()}
    curation = {k: curated.manifest()[k] for k in ("input_rows", "kept", "dropped", "drop_reasons")}
    report = build_report(
        run_name,
        teacher=metrics["teacher"],
        students={name: {**metrics[name], **info} for name, info in students.items()},
        curation=curation,
    )
    markdown = render_markdown(report)
    _write_atomic(Path(run_dir) / "report.json", json.dumps(report, indent=2))
    _write_atomic(Path(run_dir) / "report.md", markdown)
    create_markdown_artifact(key=f"{run_name}-report", markdown=markdown, description=f"kdflow report for {run_name}")
    return report
