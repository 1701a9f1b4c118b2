"""The curves stage: each snapshot a student saved while training (``curve_points``), answered on the evaluation
split — the evaluate stage's quality figure (accuracy, or ROUGE-L on instruction data) against student steps and
training wall time (kdflow/evaluation/curves.py)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from data.checkers import answer_checker
from kdflow.config.data import DataSource
from kdflow.config.evaluation import EvaluationSection
from kdflow.evaluation.curves import CURVE_FILE, curve_quality
from kdflow.reporting.quality_metric import source_metric
from kdflow.store.outputs import OutputRef
from kdflow.store.run_folder import read_split
from kdflow.store.stage import Stage
from tasks.caching import STAGE_RESULTS, StageCache

# The metric follows from the source, which is in the key: instruction-data curves have keys of their own. The
# snapshots are loaded in the section's dtype, which the key holds.
CURVES = Stage(
    "curves",
    "2",
    lambda section, template, source, student, data: {
        "section": section,
        "template": template,
        "source": source.value,
        "student": student,
        "data": data,
    },
    files=(CURVE_FILE,),
)


# Its task run name is given by the flow (``.with_options``): only the flow knows which student this is.
@task(cache_policy=StageCache(CURVES), **STAGE_RESULTS)
def evaluate_curve(
    run_dir: Path, section: EvaluationSection, template: str, source: DataSource, student: OutputRef, data: OutputRef
) -> OutputRef:
    out = CURVES.output(run_dir, section=section, template=template, source=source, student=student, data=data)
    if done := out.done:
        return done
    rows = read_split(data, section.split)
    curve = curve_quality(
        Path(student.path),
        rows,
        template,
        source_metric(source),
        answer_checker(source)[0],  # instruction data's refuses to be called, and is not: ROUGE-L needs none
        section.max_new_tokens,
        section.batch_size,
        section.dtype,
    )
    with out.building() as tmp:
        (tmp / CURVE_FILE).write_text(json.dumps(curve, indent=1))
        out.finish(tmp, rows=len(rows), points=len(curve["points"]), name=student.manifest().get("name"))
    return out.ref()
