"""Does white-box KD add anything? Transfer-set sizes × {seq-KD, logit KD} × seeds on one recipe's run, with
a table, a plot and a stated verdict (kdflow/reporting/sweep.py). Not part of `make demo`: it trains many students.

    python -m flows.kd_sweep recipes/sweeps/transfer-size.yaml
"""

from __future__ import annotations

import json

from prefect import flow

from flows.chain import evaluate_models, upstream
from flows.cli import run_as_script
from kdflow.config.recipe import load_recipe
from kdflow.config.sweep import load_sweep
from kdflow.evaluation.model_metrics import read_metrics
from kdflow.reporting import sweep as sw
from kdflow.store.outputs import OutputRef, write_atomic
from kdflow.training.student import needs_routed_teachers, student_inputs, student_rows
from tasks.students import train_student

SEQ_KD = "seq-kd"


# No log_prints (see flows/distill.py).
@flow(name="kd-sweep")
def kd_sweep(sweep: str = "recipes/sweeps/transfer-size.yaml") -> dict:
    s = load_sweep(sweep)  # a bad sweep or recipe fails here, before any work
    r = load_recipe(s.recipe_path())
    run_dir, cot = r.run_dir, r.prompts.cot_text()
    students = s.students()

    # The recipe's own stages: cached, so a sweep after `make demo` starts at the students.
    u = upstream(r)
    data, teacher, curated = u.data, u.teacher, u.curated
    trained: dict[str, OutputRef] = {
        st.name: train_student(
            run_dir,
            st,
            cot,
            teacher,
            data,
            *student_inputs(st, curated, u.logits),
            routed=u.routed(r) if needs_routed_teachers(st) else None,
        )
        for st in students
    }
    evaluations = evaluate_models(run_dir, r, {"teacher": teacher, **trained}, teacher, data)

    accuracy = {name: read_metrics(ref.path)["accuracy"] for name, ref in evaluations.items() if name != "teacher"}
    rows = {
        st.data_fraction: len(student_rows(st, cot, data, curated, logits=u.logits))
        for st in students
        if st.seed == s.seeds[0]
    }
    summary = sw.summarise(accuracy, rows, read_metrics(evaluations["teacher"].path)["accuracy"])
    reference = next((m for m, kd in s.methods.items() if kd is None), SEQ_KD)
    out = run_dir / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "sweep.png", sw.plot_curves(summary, rows))
    write_atomic(
        out / "sweep.json", json.dumps({"sweep": s.model_dump(mode="json"), "rows": rows, **summary}, indent=2)
    )
    write_atomic(out / "sweep.md", sw.render(summary, reference, "sweep.png"))
    print(f"sweep report: {out / 'sweep.md'}")
    print("\n".join(sw.regime_lines(summary, reference)))
    return summary


if __name__ == "__main__":
    run_as_script("sweep")  # the same arguments and --help as `kdflow sweep`
