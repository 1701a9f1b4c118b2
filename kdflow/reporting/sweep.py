"""Does white-box KD add anything over sequence-level KD? A sweep over transfer-set sizes × methods × seeds.

Hinton et al. (2015) found soft targets matter most when the transfer set is small (speech: 3 % of the data,
57.0 % frame accuracy with soft targets vs 44.5 % with hard ones). The sweep trains one recipe student on a
share of the teacher's kept answers (``data_fraction``, the same rows for every method at one seed), once
per method — plain SFT on the teacher's text (seq-KD) and one or more white-box KD losses — and seed, and
reports accuracy against transfer-set size with the seed spread.

The verdict is deliberately conservative: at a given size, a method *beats* another only when its mean
accuracy exceeds the other's by more than the sum of their seed standard deviations. The sweep's recipe
(``SweepRecipe``, ``load_sweep``) is in kdflow/config/sweep.py.
"""

from __future__ import annotations

import statistics


def parse_name(name: str) -> tuple[str, float, int]:
    """``logit-fkl-0.03@2`` -> (``logit-fkl``, 0.03, 2)."""
    rest, seed = name.rsplit("@", 1)
    method, fraction = rest.rsplit("-", 1)
    return method, float(fraction), int(seed)


def summarise(accuracy: dict[str, float], rows: dict[float, int], teacher: float) -> dict:
    """``accuracy``: student name -> test accuracy; ``rows``: fraction -> transfer-set rows.

    Returns per method and fraction the accuracies over seeds with mean, sd, min, max; and per fraction
    the best method and whether it beats each other by more than the seed spread.
    """
    cells: dict[str, dict[float, list[float]]] = {}
    for name, acc in accuracy.items():
        method, fraction, _ = parse_name(name)
        cells.setdefault(method, {}).setdefault(fraction, []).append(acc)
    curves = {m: {f: stats(v) for f, v in sorted(by_f.items())} for m, by_f in cells.items()}
    verdicts = []
    for fraction in sorted({f for by_f in curves.values() for f in by_f}):
        here = {m: curves[m][fraction] for m in curves if fraction in curves[m]}
        best = max(here, key=lambda m: here[m]["mean"])
        for other in here:
            if other == best:
                continue
            v = beats(here[best], here[other])
            verdicts.append(
                {
                    "fraction": fraction,
                    "rows": rows.get(fraction),
                    "best": best,
                    "other": other,
                    "margin": v["margin"],
                    "spread": v["spread"],
                    "beats": v["verdict"] == "beats",
                }
            )
    return {"teacher_accuracy": teacher, "curves": curves, "verdicts": verdicts}


def stats(values: list[float]) -> dict:
    """Accuracies over seeds: the values, mean, sample standard deviation (0 for one seed), min and max."""
    return {
        "accuracy": values,
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def beats(a: dict, b: dict) -> dict:
    """The verdict rule, for two ``stats``: ``a`` beats ``b`` only when its mean exceeds b's by more than the sum of
    their seed standard deviations (and loses when b's exceeds a's so); otherwise they are within the spread."""
    margin, spread = a["mean"] - b["mean"], a["sd"] + b["sd"]
    verdict = "beats" if margin > spread else "loses" if -margin > spread else "within"
    return {"margin": margin, "spread": spread, "verdict": verdict}


def regime_lines(summary: dict, reference: str) -> list[str]:
    """Plain sentences: where (if anywhere) a white-box method beats ``reference`` (seq-KD) beyond the spread."""
    wins = [v for v in summary["verdicts"] if v["beats"] and v["best"] != reference and v["other"] == reference]
    losses = [v for v in summary["verdicts"] if v["beats"] and v["best"] == reference]
    out = []
    for v in wins:
        out.append(
            f"- At {v['fraction']:g} of the transfer set ({v['rows']} rows), **{v['best']} beats {reference}** by "
            f"{v['margin']:.3f} accuracy, more than the seed spread ({v['spread']:.3f})."
        )
    for v in losses:
        out.append(
            f"- At {v['fraction']:g} ({v['rows']} rows), {reference} beats {v['other']} by {v['margin']:.3f} "
            f"(spread {v['spread']:.3f})."
        )
    if not wins:
        out.append(
            f"- No transfer-set size where a white-box method beats {reference} by more than the seed spread: "
            "on this task, at these settings, the gain comes from the teacher-labelled prompts, not the logits."
        )
    return out


def render(summary: dict, reference: str, plot: str | None) -> str:
    methods = list(summary["curves"])
    fractions = sorted({f for c in summary["curves"].values() for f in c})
    rows = {v["fraction"]: v["rows"] for v in summary["verdicts"]}
    lines = [
        "# kdflow sweep: transfer-set size × method × seed",
        "",
        f"Teacher accuracy: {summary['teacher_accuracy']:.3f}. Cells: test accuracy, mean ± sd over seeds (min – max).",
        "",
        "| share of transfer set | rows | " + " | ".join(methods) + " |",
        "|---:|---:|" + "---|" * len(methods),
    ]
    for f in fractions:
        cells = []
        for m in methods:
            c = summary["curves"][m].get(f)
            cells.append("—" if c is None else f"{c['mean']:.3f} ± {c['sd']:.3f} ({c['min']:.3f} – {c['max']:.3f})")
        lines.append(f"| {f:g} | {rows.get(f, '—')} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Where does white-box KD beat seq-KD?",
        "",
        *regime_lines(summary, reference),
        "",
        "A method beats another only where its mean exceeds the other's by more than the sum of their seed "
        "standard deviations.",
        "",
    ]
    if plot:
        lines += [f"![accuracy vs transfer-set size]({plot})", ""]
    return "\n".join(lines)


def plot_curves(summary: dict, rows: dict[float, int]) -> bytes:
    """Accuracy vs transfer-set rows (log scale), mean with a ±sd band, one line per method; PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # off-screen: flows run without a display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, curve in summary["curves"].items():
        xs = [rows[f] for f in curve]
        mean = [c["mean"] for c in curve.values()]
        sd = [c["sd"] for c in curve.values()]
        ax.plot(xs, mean, marker="o", label=method)
        ax.fill_between(xs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.2)
    ax.axhline(summary["teacher_accuracy"], color="grey", linestyle="--", label="teacher")
    ax.set_xscale("log")
    # the measured sizes as the only ticks: log-axis minor labels (3×10², 4×10², …) run into each other
    ax.set_xticks(sorted(set(rows.values())), [f"{n:,}" for n in sorted(set(rows.values()))])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("transfer set (teacher-labelled rows)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
