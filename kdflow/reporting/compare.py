"""Compare two or more runs in one table, from their report.json files.

    python -m kdflow.reporting.compare runs/demo runs/demo-long-students [--out compare.md]

Latency and throughput are only comparable between runs measured on the same machine: the table's notes
list each run's machine so that a difference of hardware is not read as a difference of models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kdflow.reporting.quality_metric import metric_of
from kdflow.reporting.run_report import REPORT_JSON, teacher_source

COLUMNS = [  # (key in a model's report entry, column title, format)
    ("data", "trained on", "{}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("rouge_l", "ROUGE-L", "{:.1f}"),  # instruction data (source: instructions), where there is no accuracy
    ("gap_closure", "gap closed", "{:.2f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("agreement", "top-1 agreement", "{:.3f}"),
    ("kl", "KL(teacher ‖ model)", "{:.4f}"),
    ("judge_win_rate", "judge win rate vs teacher", "{:.3f}"),
    ("params", "parameters", "{:,}"),
    ("flops_per_token", "FLOPs / token", "{:,}"),
    ("latency_ms_per_token", "latency ms / token", "{:.3g}"),
    ("throughput_tokens_per_s", "throughput tokens / s", "{:,.0f}"),
]


def load_report(path: str | Path) -> dict:
    """A run's report.json, from the run folder or the file itself."""
    path = Path(path)
    file = path / REPORT_JSON if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {REPORT_JSON}; pass a run folder (runs/<name>) whose flow has finished")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # cut short (a killed write, a full disk) or overwritten
        raise ValueError(
            f"{file}: not a readable report ({e}); the run's report is damaged: rerun `kdflow evaluate` on its recipe "
            "to write it again"
        ) from None


def columns(reports: dict[str, dict]) -> list[tuple[str, str, str]]:
    """``COLUMNS``, less the quality metric no run was judged by (ROUGE-L for runs on checked answers, and back)."""
    used = {metric_of(report) for report in reports.values()}
    return [c for c in COLUMNS if c[0] not in {"accuracy", "rouge_l"} - used]


def rows(reports: dict[str, dict]) -> list[dict]:
    """One row per (run, model): the teacher first, then the students, in each report's order. Fields a
    report does not have (an older report, a metric not measured) are None."""
    out = []
    for label, report in reports.items():
        models = {"teacher": {**report["teacher"], "data": _teacher_data(report["teacher"])}, **report["students"]}
        for name, m in models.items():
            out.append({"run": label, "model": name, **{key: m.get(key) for key, _, _ in columns(reports)}})
    return out


def _teacher_data(teacher: dict) -> str:
    """What the teacher row's "trained on" says: what the run's own report says of its teacher (``teacher_source``:
    gold only for one trained here, never for a given folder or an API model)."""
    if teacher.get("imported"):  # no row in the run's own report: here the row says why it is empty
        return f"{teacher.get('model')}: imported logits only, not evaluated"
    return teacher_source(teacher)


def _cell(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def render(reports: dict[str, dict]) -> str:
    shown = columns(reports)
    lines = [
        "| run | model | " + " | ".join(t for _, t, _ in shown) + " |",
        "|---|---|---|" + "---:|" * (len(shown) - 1),
    ]
    for r in rows(reports):
        lines.append(f"| {r['run']} | {r['model']} | " + " | ".join(_cell(r[k], f) for k, _, f in shown) + " |")
    lines += ["", "Machines (latency and throughput compare across runs only on the same one):"]
    for label, report in reports.items():
        m = (report.get("deployment") or {}).get("machine")
        where = (
            f"{m['device']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} thread(s)"
            if m
            else "not recorded"
        )
        lines.append(f"- {label}: {where}")
    return "\n".join(lines) + "\n"


def labels(paths: list[str]) -> list[str]:
    """Each run's name: its folder name, or the path itself where two folder names clash."""
    names = [Path(p).name if Path(p).is_dir() else Path(p).parent.name for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdflow.reporting.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (runs/<name>) or their report.json files")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give two or more run folders to compare")
    if args.out and Path(args.out).is_dir():  # before the table is printed, not as a traceback after it
        parser.error(
            f"--out {args.out}: a folder, not a file; name the Markdown file to write, "
            f"e.g. {Path(args.out) / 'compare.md'}"
        )
    try:
        reports = {label: load_report(p) for label, p in zip(labels(args.runs), args.runs)}
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    table = render(reports)
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
