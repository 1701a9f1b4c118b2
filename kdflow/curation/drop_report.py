"""What curation kept and threw away: counts per reason, token-length histograms of kept vs dropped rows
(a markdown table and a PNG), and a few example drops per reason with their raw text."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

EXAMPLES_PER_REASON = 3
REPORT_MD, REPORT_JSON, LENGTHS = "report.md", "report.json", "lengths.png"
FILES = (REPORT_MD, REPORT_JSON, LENGTHS)


def reason_table(kept: list[dict], dropped: list[dict]) -> pd.DataFrame:
    """One row per reason: how many dropped rows carry it, and how many carry it alone. A row with two
    reasons counts under both, so the column sums to more than the drops; `only` sums to at most that."""
    counts = Counter(r for row in dropped for r in row["reasons"])
    alone = Counter(row["reasons"][0] for row in dropped if len(row["reasons"]) == 1)
    total = len(kept) + len(dropped)
    table = pd.DataFrame(
        [
            {"reason": r, "rows": n, "only": alone[r], "% of input": round(100 * n / total, 2)}
            for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
        columns=["reason", "rows", "only", "% of input"],
    )
    return table


def lengths(rows: list[dict]) -> list[int]:
    """Answer lengths in tokens: the student's (``tokens``) when measured, else the teacher's count."""
    return [
        _count(r.get("tokens")) if r.get("tokens") is not None else _count(r.get("completion_tokens")) for r in rows
    ]


def _count(value) -> int:
    return 0 if value is None or pd.isna(value) else int(value)


def length_histogram(kept: list[dict], dropped: list[dict], bins: int = 10) -> pd.DataFrame:
    k, d = lengths(kept), lengths(dropped)
    if not k and not d:
        return pd.DataFrame(columns=["tokens", "kept", "dropped"])
    edges = np.unique(np.histogram_bin_edges(k + d, bins=bins).round().astype(int))
    if len(edges) < 2:
        edges = np.array([edges[0], edges[0] + 1])
    kc, _ = np.histogram(k, edges)
    dc, _ = np.histogram(d, edges)
    labels = [
        f"{lo}–{hi - 1}" if i < len(edges) - 2 else f"{lo}–{hi}"
        for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))
    ]
    return pd.DataFrame({"tokens": labels, "kept": kc, "dropped": dc})


def plot_lengths(kept: list[dict], dropped: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    both = lengths(kept) + lengths(dropped)
    bins = np.linspace(min(both, default=0), max(both, default=1) + 1, 30)
    ax.hist([lengths(kept), lengths(dropped)], bins=bins, label=["kept", "dropped"], stacked=True)
    ax.set_xlabel("answer length (tokens)")
    ax.set_ylabel("rows")
    ax.legend(loc="upper right")  # "best" searches every bar: slow on 100k rows
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def examples(dropped: list[dict]) -> list[dict]:
    out, seen = [], Counter()
    for row in dropped:
        reason = row["reasons"][0]
        if seen[reason] < EXAMPLES_PER_REASON:
            seen[reason] += 1
            out.append(
                {
                    "reason": ", ".join(row["reasons"]),
                    "id": f"{row['id']}/{row.get('sample', 0)}",
                    "detail": row.get("detail", ""),
                    "text": (row["text"] or "")[:200],
                }
            )
    return out


def markdown(table: pd.DataFrame) -> str:
    """A pipe table (pandas' to_markdown needs the tabulate package, which nothing else here uses)."""
    return "\n".join(
        [_cells(table.columns), "|" + "---|" * len(table.columns), *(_cells(r) for r in table.itertuples(index=False))]
    )


def _cells(values) -> str:
    return "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ⏎ ") for v in values) + " |"


def write(folder: Path, kept: list[dict], dropped: list[dict]) -> dict:
    """report.md, report.json and lengths.png in ``folder``; returns report.json's content."""
    reasons, hist = reason_table(kept, dropped), length_histogram(kept, dropped)
    plot_lengths(kept, dropped, folder / LENGTHS)
    total = len(kept) + len(dropped)
    summary = {
        "input_rows": total,
        "kept": len(kept),
        "dropped": len(dropped),
        "reasons": reasons.to_dict("records"),
        "length_histogram": hist.to_dict("records"),
        "examples": examples(dropped),
    }
    ex = pd.DataFrame(summary["examples"], columns=["reason", "id", "detail", "text"])
    md = [
        "# Curation report",
        "",
        f"{total} teacher answers in, {len(kept)} kept, {len(dropped)} dropped (kept + dropped = input).",
        "",
        "## Drops by reason",
        "",
        markdown(reasons) if len(reasons) else "Nothing was dropped.",
        "",
        "## Answer length (tokens), kept vs dropped",
        "",
        markdown(hist),
        "",
        "![lengths](lengths.png)",
        "",
        "## Example drops (every drop is in dropped.parquet with its raw text)",
        "",
        markdown(ex) if len(ex) else "None.",
        "",
    ]
    (folder / REPORT_MD).write_text("\n".join(md))
    (folder / REPORT_JSON).write_text(json.dumps(summary, indent=2, default=str))
    return summary
