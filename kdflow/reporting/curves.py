"""Learning curves of a study (flows/learning_curves.py): test quality against student steps and against training
wall time, per arm, mean ± sd over seeds; the sweep's verdict rule at every step (A beats B only when its mean
exceeds B's by more than the sum of their seed standard deviations, ``sweep.beats``); and how many steps each arm
needs to reach the reference's (seq-KD's) final figure. The quality is the evaluate stage's for the data (``metric``:
accuracy, or ROUGE-L × 100 on instruction data, ``quality_metric.QUALITY``), named so in every sentence and axis.
"""

from __future__ import annotations

import statistics

from kdflow.reporting.quality_metric import QUALITY
from kdflow.reporting.sweep import beats, stats


def arm_of(name: str) -> tuple[str, int]:
    """``on-policy@2`` -> (``on-policy``, 2)."""
    arm, seed = name.rsplit("@", 1)
    return arm, int(seed)


def shifted(points: list[dict], step: int, seconds: float) -> list[dict]:
    """A warm-started arm's points, counted from the start of its warm start (``step``, ``seconds`` of the snapshot
    it started from), so that its steps and time include the warm start's."""
    return [{**p, "step": p["step"] + step, "seconds": p["seconds"] + seconds} for p in points]


def summarise(
    curves: dict[str, list[dict]], reference: str, teacher: float | None = None, metric: str = "accuracy"
) -> dict:
    """``curves``: ``<arm>@<seed>`` -> points ``{step, seconds, <metric>}``. Returns per arm and step the metric
    over seeds (``stats``) and the mean wall time; the verdicts of every arm against ``reference`` at each step
    both have; and ``reach``: per arm, the first step (and time) whose mean reaches the reference's final mean.
    ``teacher``: the teacher's figure on the same split (``teacher_<metric>``), None where there is none."""
    if metric not in QUALITY:
        raise ValueError(f"no learning curve of {metric!r}: one of {sorted(QUALITY)}")
    cells: dict[str, dict[int, list[dict]]] = {}
    for name, points in curves.items():
        arm, _ = arm_of(name)
        for p in points:
            cells.setdefault(arm, {}).setdefault(p["step"], []).append(p)
    arms = {
        arm: {
            step: {
                **stats([p[metric] for p in ps]),
                "seconds": statistics.fmean(p["seconds"] for p in ps),
                "seeds": len(ps),
            }
            for step, ps in sorted(by_step.items())
        }
        for arm, by_step in cells.items()
    }
    if reference not in arms:
        raise ValueError(f"reference arm {reference!r} has no curve; arms: {sorted(arms)}")
    ref = arms[reference]
    verdicts = [
        {"step": step, "arm": arm, **beats(curve[step], ref[step])}
        for arm, curve in arms.items()
        if arm != reference
        for step in curve
        if step in ref
    ]
    final_step = max(ref)
    target = ref[final_step]["mean"]
    reach = {}
    for arm, curve in arms.items():
        step = next((s for s, c in curve.items() if c["mean"] >= target), None)
        reach[arm] = {
            "step": step,
            "seconds": curve[step]["seconds"] if step else None,
            "share_of_reference_steps": step / final_step if step else None,
        }
    return {
        "reference": reference,
        "metric": metric,
        f"teacher_{metric}": teacher,
        "arms": arms,
        "verdicts": verdicts,
        "target": {"step": final_step, metric: target, "seconds": ref[final_step]["seconds"]},
        "reach": reach,
    }


def teacher_figure(summary: dict) -> float | None:
    return summary[f"teacher_{summary['metric']}"]


def verdict_lines(summary: dict) -> list[str]:
    """Plain sentences: where an arm beats the reference (or loses to it) by more than the seed spread, and how
    soon each arm reaches the reference's final figure."""
    ref, t, metric = summary["reference"], summary["target"], summary["metric"]
    title, fmt = QUALITY[metric]
    final = f"final {title} ({t[metric]:{fmt}}"
    out = []
    for v in summary["verdicts"]:
        if v["verdict"] == "beats":
            out.append(
                f"- At step {v['step']}, **{v['arm']} beats {ref}** by {v['margin']:{fmt}} (seed spread "
                f"{v['spread']:{fmt}})."
            )
        elif v["verdict"] == "loses":
            out.append(
                f"- At step {v['step']}, {ref} beats {v['arm']} by {-v['margin']:{fmt}} (seed spread "
                f"{v['spread']:{fmt}})."
            )
    if not any(v["verdict"] == "beats" for v in summary["verdicts"]):
        out.append(f"- No step at which an arm beats {ref} by more than the seed spread.")
    for arm, r in summary["reach"].items():
        if arm == ref:
            continue
        if r["step"] is None:
            out.append(f"- {arm} does not reach {ref}'s {final} at step {t['step']}) at any measured step.")
        else:
            out.append(
                f"- {arm} reaches {ref}'s {final}) at step {r['step']}: "
                f"{r['share_of_reference_steps']:.0%} of {ref}'s {t['step']} steps, {r['seconds']:.0f} s of "
                f"training ({ref}: {t['seconds']:.0f} s)."
            )
    return out


def render(summary: dict, plot: str | None, title: str = "kdflow learning curves") -> str:
    arms = summary["arms"]
    steps = sorted({s for curve in arms.values() for s in curve})
    seeds = max(c["seeds"] for curve in arms.values() for c in curve.values())
    teacher, (name, fmt) = teacher_figure(summary), QUALITY[summary["metric"]]
    lines = [
        f"# {title}",
        "",
        (f"Teacher {name}: {teacher:{fmt}}. " if teacher is not None else "")
        + f"Cells: test {name}, mean ± sd over {seeds} seeds, and the mean training wall time to that step.",
        "",
        "| student steps | " + " | ".join(arms) + " |",
        "|---:|" + "---|" * len(arms),
    ]
    for step in steps:
        cells = []
        for arm in arms:
            c = arms[arm].get(step)
            cells.append("—" if c is None else f"{c['mean']:{fmt}} ± {c['sd']:{fmt}} ({c['seconds']:.0f} s)")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Against {summary['reference']}",
        "",
        *verdict_lines(summary),
        "",
        "An arm beats another only where its mean exceeds the other's by more than the sum of their seed "
        "standard deviations.",
        "",
    ]
    if plot:
        lines += [f"![{name} vs student steps and wall time]({plot})", ""]
    return "\n".join(lines)


def plot_curves(summary: dict) -> bytes:
    """Two panels: the metric vs student steps and vs training seconds, mean with a ±sd band per arm, the teacher's
    figure as a dashed line; PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # off-screen: flows run without a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, x, label in ((axes[0], "step", "student steps"), (axes[1], "seconds", "training wall time (s)")):
        for arm, curve in summary["arms"].items():
            xs = list(curve) if x == "step" else [c["seconds"] for c in curve.values()]
            mean = [c["mean"] for c in curve.values()]
            sd = [c["sd"] for c in curve.values()]
            ax.plot(xs, mean, marker="o", label=arm)
            ax.fill_between(xs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.15)
        if (teacher := teacher_figure(summary)) is not None:
            ax.axhline(teacher, color="grey", linestyle="--", label="teacher")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    metric = summary["metric"]
    axes[0].set_ylabel(f"test {QUALITY[metric][0]}")
    if metric == "accuracy":  # a share; ROUGE-L (× 100) of a small student sits far below 100: its own scale
        axes[0].set_ylim(0, 1.02)
    else:
        axes[0].set_ylim(bottom=0)
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
