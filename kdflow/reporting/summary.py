"""The end-of-run summary the distill flow prints: where the report is, and one line per model."""

from __future__ import annotations

from kdflow.reporting.quality_metric import QUALITY, metric_of


def summary_lines(report: dict, path) -> list[str]:
    """Where the report is, then each model's quality (accuracy, or ROUGE-L on
    instruction data), perplexity, size and latency; an API teacher's quality only (its weights are not here)."""
    key = metric_of(report)
    title, fmt = QUALITY[key]
    lines = [f"report: {path}"]
    for name, m in {"teacher": report["teacher"], **report["students"]}.items():
        if m.get("imported"):
            lines.append(f"  {name:>10}: {m['model']}, not here ({m['weights']})")
            continue
        if m.get("api"):
            lines.append(f"  {name:>10}: {title} {m[key]:{fmt}} ({m['model']} through the API; {m['weights']})")
            continue
        lines.append(
            f"  {name:>10}: {title} {m[key]:{fmt}}, perplexity {m['perplexity']:.3f}, "
            f"{m['params']:,} parameters, {m['latency_ms_per_token']:.2f} ms/token"
        )
    return lines
