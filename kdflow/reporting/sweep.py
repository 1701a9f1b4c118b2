"""Does white-box KD add anything over sequence-level KD? A sweep over transfer-set sizes × methods × seeds.

Hinton et al. (2015) found soft targets matter most when the transfer set is small (speech: 3 % of the data,
57.0 % frame accuracy with soft targets vs 44.5 % with hard ones). The sweep trains one recipe student on a
share of the teacher's kept answers (``data_fraction``, the same rows for every method at one seed), once
per method — plain SFT on the teacher's text (seq-KD) and one or more white-box KD losses — and seed, and
reports accuracy against transfer-set size with the seed spread.

The verdict is deliberately conservative: at a given size, a method *beats* another only when its mean
accuracy exceeds the other's by more than the sum of their seed standard deviations.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from kdflow.config.recipe import (
    ROOT,
    SAFE_NAME,
    SAFE_NAME_FIX,
    FieldError,
    KDSection,
    RecipeError,
    SafeName,
    Strict,
    StudentData,
    load_recipe,
    load_yaml,
    read_recipe_text,
    validation_problems,
)


class SweepRecipe(Strict):
    recipe: str = Field(description="the distillation recipe whose run (data, teacher, answers, logit cache) is used")
    student: SafeName = Field(description="the recipe student (data: teacher) whose architecture and training are swept")
    fractions: list[float] = Field(min_length=1, description="shares of the kept teacher answers, each in (0, 1]")
    seeds: list[int] = Field(min_length=1, description=">= 3 for a mean and a spread worth reading")
    methods: dict[str, KDSection | None] = Field(min_length=2, description="name -> kd section; null = seq-KD (SFT)")
    training: dict[str, Any] = Field(default_factory=dict, description="overrides of the student's training keys")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < f <= 1.0 for f in v):
            raise ValueError(f"each fraction must be in (0, 1], got {v}")
        return sorted(set(v))

    @field_validator("methods")
    @classmethod
    def _method_names(cls, v: dict) -> dict:
        # each becomes a student name, `<method>-<fraction>@<seed>` (parse_name splits it again)
        for name in v:
            if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
                raise FieldError(f"method name {name!r}: {SAFE_NAME_FIX} (it names the students trained with it)", name)
        return v

    @model_validator(mode="after")
    def _one_sft(self):
        if not any(kd is None for kd in self.methods.values()):
            raise ValueError("methods needs one seq-KD entry (`name: null`) for the others to be compared with")
        return self

    def recipe_path(self) -> Path:
        p = Path(self.recipe)
        return p if p.is_absolute() else ROOT / p

    def students(self):
        """Every student to train: ``<method>-<fraction>@<seed>``, the recipe student's copy for each."""
        r = load_recipe(self.recipe_path())
        base = next((s for s in r.students if s.name == self.student), None)
        if base is None:
            raise RecipeError(f"{self.recipe}: no student named {self.student!r}; students: {[s.name for s in r.students]}")
        if base.data is not StudentData.teacher:
            raise RecipeError(f"sweep.student: {self.student!r} learns from gold data; pick a `data: teacher` student")
        training = {**base.training, **self.training}
        return [base.model_copy(update={"name": f"{method}-{fraction:g}@{seed}", "kd": kd, "seed": seed,
                                        "data_fraction": fraction, "training": training})
                for fraction in self.fractions for method, kd in self.methods.items() for seed in self.seeds]


def load_sweep(path: str | Path) -> SweepRecipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such sweep file")
    text = read_recipe_text(path)
    raw = load_yaml(text, str(path), "a sweep is a YAML mapping with recipe, student, fractions, seeds, methods")
    try:
        sweep = SweepRecipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError("invalid sweep\n  " + "\n  ".join(validation_problems(e, text, str(path)))) from None
    if not sweep.recipe_path().is_file():
        raise RecipeError(f"{path}: recipe: no file {sweep.recipe_path()}; point it at a distillation recipe")
    load_recipe(sweep.recipe_path())  # a bad recipe fails here too, before any work
    return sweep


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
    curves = {m: {f: _stats(v) for f, v in sorted(by_f.items())} for m, by_f in cells.items()}
    verdicts = []
    for fraction in sorted({f for by_f in curves.values() for f in by_f}):
        here = {m: curves[m][fraction] for m in curves if fraction in curves[m]}
        best = max(here, key=lambda m: here[m]["mean"])
        for other in here:
            if other == best:
                continue
            margin = here[best]["mean"] - here[other]["mean"]
            spread = here[best]["sd"] + here[other]["sd"]
            verdicts.append({"fraction": fraction, "rows": rows.get(fraction), "best": best, "other": other,
                             "margin": margin, "spread": spread, "beats": margin > spread})
    return {"teacher_accuracy": teacher, "curves": curves, "verdicts": verdicts}


def _stats(values: list[float]) -> dict:
    return {"accuracy": values, "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def regime_lines(summary: dict, reference: str) -> list[str]:
    """Plain sentences: where (if anywhere) a white-box method beats ``reference`` (seq-KD) beyond the spread."""
    wins = [v for v in summary["verdicts"] if v["beats"] and v["best"] != reference and v["other"] == reference]
    losses = [v for v in summary["verdicts"] if v["beats"] and v["best"] == reference]
    out = []
    for v in wins:
        out.append(f"- At {v['fraction']:g} of the transfer set ({v['rows']} rows), **{v['best']} beats {reference}** by "
                   f"{v['margin']:.3f} accuracy, more than the seed spread ({v['spread']:.3f}).")
    for v in losses:
        out.append(f"- At {v['fraction']:g} ({v['rows']} rows), {reference} beats {v['other']} by {v['margin']:.3f} "
                   f"(spread {v['spread']:.3f}).")
    if not wins:
        out.append(f"- No transfer-set size where a white-box method beats {reference} by more than the seed spread: "
                   "on this task, at these settings, the gain comes from the teacher-labelled prompts, not the logits.")
    return out


def render(summary: dict, reference: str, plot: str | None) -> str:
    methods = list(summary["curves"])
    fractions = sorted({f for c in summary["curves"].values() for f in c})
    rows = {v["fraction"]: v["rows"] for v in summary["verdicts"]}
    lines = ["# kdflow sweep: transfer-set size × method × seed", "",
             f"Teacher accuracy: {summary['teacher_accuracy']:.3f}. Cells: test accuracy, mean ± sd over seeds "
             "(min – max).", "",
             "| share of transfer set | rows | " + " | ".join(methods) + " |", "|---:|---:|" + "---|" * len(methods)]
    for f in fractions:
        cells = []
        for m in methods:
            c = summary["curves"][m].get(f)
            cells.append("—" if c is None else f"{c['mean']:.3f} ± {c['sd']:.3f} ({c['min']:.3f} – {c['max']:.3f})")
        lines.append(f"| {f:g} | {rows.get(f, '—')} | " + " | ".join(cells) + " |")
    lines += ["", "## Where does white-box KD beat seq-KD?", "", *regime_lines(summary, reference), "",
              "A method beats another only where its mean exceeds the other's by more than the sum of their seed "
              "standard deviations.", ""]
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
