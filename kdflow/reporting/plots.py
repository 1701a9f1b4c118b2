"""The run report's plots (matplotlib, off-screen, PNG bytes): each model's loss curves, and quality against
cost for every model. The tables and numbers are in kdflow/reporting/run_report.py."""

from __future__ import annotations

import io

from kdflow.reporting.quality_metric import QUALITY, metric_of
from kdflow.reporting.run_report import report_models, si_number


def _figure(panels: int, width: float, height: float, per_row: int = 3):
    """A figure of ``panels`` axes, at most ``per_row`` to a row, each ``width`` × ``height`` inches."""
    import matplotlib

    matplotlib.use("Agg")  # off-screen: flows run without a display
    import matplotlib.pyplot as plt

    columns, rows = min(panels, per_row), -(-panels // per_row)
    fig, axes = plt.subplots(
        rows, columns, figsize=(width * columns, height * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[panels:]:
        ax.remove()
    return fig, list(axes.flat[:panels])


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def loss_curves(history: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Loss series of a trainer's log history: ``loss`` (the total) and every other ``*loss*`` key logged
    during training (e.g. the CE and KD terms of a distillation loss), as (steps, values); the end-of-training
    summary (``train_loss``) and evaluation losses are left out."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for entry in history:
        if "step" not in entry or "train_runtime" in entry:
            continue
        for key, value in entry.items():
            if "loss" in key and not key.startswith(("train_", "eval_")) and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(entry["step"])
                values.append(value)
    return series


def plot_losses(histories: dict[str, list[dict]]) -> bytes | None:
    """Training loss per model (one panel each), its terms apart where the trainer logged them."""
    curves = {name: c for name, h in histories.items() if (c := loss_curves(h))}
    if not curves:
        return None
    from matplotlib import ticker

    fig, axes = _figure(len(curves), 3.6, 3.0)
    for ax, (name, series) in zip(axes, curves.items()):
        for key, (steps, values) in series.items():
            ax.plot(steps, values, label=key, lw=1.5)
        ax.set_yscale("log")  # losses fall by orders of magnitude; the late steps matter too
        ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2, 5)))
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[::3]:
        ax.set_ylabel("training loss (log scale)")
    return _png(fig)


def plot_tradeoff(report: dict) -> bytes | None:
    """Accuracy (ROUGE-L on instruction data) against parameters and against latency: up and to the left is better."""
    models = report_models(report)
    key = metric_of(report)
    title, top = QUALITY[key][0], 1.0 if key == "accuracy" else 100.0  # accuracy is a share; ROUGE-L is × 100
    panels = [
        ("params", "parameters (log scale)", True),
        ("latency_ms_per_token", "latency ms / token, batch 1", False),
    ]
    # A figure some model lacks (an API teacher has no parameters or latency here): that model is a dashed line.
    panels = [
        p
        for p in panels
        if sum(m.get(p[0]) is not None for m in models.values()) >= 2
        or all(m.get(p[0]) is not None for m in models.values())
    ]
    if not panels:
        return None
    fig, axes = _figure(len(panels), 4.2, 3.2)
    for ax, (x_key, label, log) in zip(axes, panels):
        at: dict[tuple, list[str]] = {}  # models at the same point share one label
        for name, m in models.items():
            if m.get(x_key) is None:
                ax.axhline(m[key], ls="--", lw=1, color="#d62728" if name == "teacher" else "#1f77b4")
                ax.annotate(
                    f"{name} ({m['data']})",
                    (0.02, m[key]),
                    xycoords=("axes fraction", "data"),
                    textcoords="offset points",
                    xytext=(0, 3),
                    fontsize=8,
                )
                continue
            at.setdefault((m[x_key], m[key]), []).append(name)
        for (x, y), names in at.items():
            ax.scatter(x, y, s=40, color="#d62728" if "teacher" in names else "#1f77b4", zorder=3)
            # Below the point near the top, where a label above it would run into the frame (accuracy ~1).
            ax.annotate(
                ", ".join(names),
                (x, y),
                textcoords="offset points",
                xytext=(5, -11 if y > 0.9 * top else 4),
                fontsize=8,
            )
        if log:
            from matplotlib import ticker

            ax.set_xscale("log")
            # Labels at 1-2-5 only: labelling every minor tick of a one-decade range overlaps them.
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: si_number(v)))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.margins(x=0.15)  # room for the labels of the extreme points
        ax.set_xlabel(label)
        ax.set_ylabel(title)
        ax.set_ylim(-0.05 * top, 1.05 * top)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['run']}: {title} vs cost", fontsize=10)
    return _png(fig)
