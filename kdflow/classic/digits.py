"""Classic KD (Hinton et al. 2015) on scikit-learn's bundled handwritten digits, with plain torch MLPs.

The digits set (1,797 8×8 greyscale images, 10 classes, shipped inside scikit-learn: no download) is
split once, stratified, by a data seed; training seeds then vary only the initialisation and the order of
the mini-batches, so every seed is measured on the same test images. The teacher is a wide MLP trained
with dropout (as Hinton's MNIST teacher was; his also saw jittered inputs, which on 8×8 images did not
help here and was left out); an ensemble averages its members' log-probabilities (the geometric mean of their
predictive distributions, which stays a valid set of logits at every temperature). The student is a small
MLP trained without dropout on the clean training images, once on hard labels only (the
baseline) and once with ``hinton_loss`` against the teacher's logits on those same images.

Plain Python and torch: no Prefect imports (the tasks in ``tasks/classifier.py`` call this).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kdflow.training.losses import hinton_loss

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Features (N, D) float32 and labels (N,) int64 of one split."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def load_digits_splits(seed: int, test_fraction: float, val_fraction: float) -> dict[str, Split]:
    """train / val / test splits of the bundled digits, stratified by class, pixels scaled to [0, 1].

    ``test_fraction`` and ``val_fraction`` are fractions of the whole set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.data.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    rest_x, test_x, rest_y, test_y = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    train_x, val_x, train_y, val_y = train_test_split(
        rest_x, rest_y, test_size=val_fraction / (1 - test_fraction), stratify=rest_y, random_state=seed
    )
    arrays = {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_x, test_y)}
    return {name: Split(torch.from_numpy(a), torch.from_numpy(b)) for name, (a, b) in arrays.items()}


def mlp(inputs: int, hidden: list[int], classes: int, dropout: float, seed: int) -> nn.Sequential:
    """``inputs → hidden[0] → … → classes`` with ReLU; dropout after every hidden layer when > 0.

    Initialised from ``seed`` alone, so a student's initial weights do not depend on what ran before.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(inputs, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        inputs = width
    layers.append(nn.Linear(inputs, classes))
    return nn.Sequential(*layers)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Training:
    """The loop's knobs (the recipe's ``training`` section, as plain values)."""

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.0


def train(
    model: nn.Module,
    data: Split,
    training: Training,
    seed: int,
    *,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 1.0,
    temperature: float = 1.0,
) -> list[float]:
    """Train ``model`` in place with Adam on ``hinton_loss``; returns the mean loss of each epoch.

    ``teacher_logits``: (N, C) aligned row for row with ``data`` (same order), or None with ``alpha = 1``
    (hard labels only). ``seed`` fixes the order of the mini-batches (and dropout's masks).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay)
    history = []
    model.train()
    for _ in range(training.epochs):
        order, total = torch.randperm(len(data), generator=generator), 0.0
        for batch in order.split(training.batch_size):
            logits = model(data.x[batch])
            soft = None if teacher_logits is None else teacher_logits[batch]
            loss = hinton_loss(logits, soft, data.y[batch], alpha, temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        history.append(total / len(data))
    model.eval()
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, C), in eval mode (dropout off)."""
    model.eval()
    return model(x)


def ensemble_logits(member_logits: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the members' log-probabilities, (N, C): log of their normalised geometric mean."""
    return torch.stack([torch.log_softmax(z, dim=-1) for z in member_logits]).mean(dim=0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"accuracy", "errors", "rows"} of argmax predictions."""
    errors = int((logits.argmax(dim=-1) != labels).sum())
    return {"accuracy": 1 - errors / len(labels), "errors": errors, "rows": len(labels)}


# ---- Reports: mean and spread over seeds, Markdown, plots (matplotlib, off-screen) ----------------------


def spread(values: list[float]) -> dict:
    """{"mean", "std", "values"}: the sample standard deviation over seeds (0 for a single seed)."""
    v = torch.tensor(values, dtype=torch.float64)
    std = float(v.std()) if len(values) > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "values": list(values)}


def model_stats(per_seed: list[dict]) -> dict:
    """One model's {params, val, test} over seeds -> accuracy and error spreads."""
    return {
        "params": per_seed[0]["params"],
        "test_accuracy": spread([m["test"]["accuracy"] for m in per_seed]),
        "test_errors": spread([m["test"]["errors"] for m in per_seed]),
        "val_accuracy": spread([m["val"]["accuracy"] for m in per_seed]),
        "test_rows": per_seed[0]["test"]["rows"],
    }


def summarize(run_name: str, data_manifest: dict, distill: dict, per_seed: dict[int, dict[str, dict]]) -> dict:
    """``per_seed``: seed -> model name -> {params, val, test} (the names as ``tasks/classifier.py`` gives
    them: "teacher", "ensemble of N", "hard-label student", "KD student")."""
    names = list(next(iter(per_seed.values())))
    models = {name: model_stats([m[name] for m in per_seed.values()]) for name in names}
    teacher = models["teacher"]["params"]
    for m in models.values():
        m["teacher_size_ratio"] = round(teacher / m["params"], 1)
    ensemble = next(n for n in names if n.startswith("ensemble"))
    errors = {n: models[n]["test_errors"]["mean"] for n in names}
    # paired by seed: the two students of a seed share their initialisation and batch order
    fewer = lambda a, b: sum(m[a]["test"]["errors"] < m[b]["test"]["errors"] for m in per_seed.values())  # noqa: E731
    return {
        "run": run_name,
        "data": {"source": data_manifest["source"], "splits": data_manifest["splits"]},
        "distill": distill,
        "seeds": list(per_seed),
        "models": models,
        "kd_beats_hard_label": errors["KD student"] < errors["hard-label student"],
        "ensemble_beats_teacher": errors[ensemble] < errors["teacher"],
        "seeds_kd_beats_hard_label": fewer("KD student", "hard-label student"),
        "seeds_ensemble_beats_teacher": fewer(ensemble, "teacher"),
    }


def _pm(s: dict, scale: float = 1.0, digits: int = 2) -> str:
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def table_rows(report: dict) -> list[dict]:
    """The report's models as rows (for a Prefect table artifact)."""
    return [
        {
            "model": name,
            "parameters": m["params"],
            "teacher/model size": m["teacher_size_ratio"],
            "test accuracy % (mean)": round(100 * m["test_accuracy"]["mean"], 2),
            "test accuracy % (std)": round(100 * m["test_accuracy"]["std"], 2),
            "test errors (mean)": round(m["test_errors"]["mean"], 2),
            "test errors per seed": " ".join(str(v) for v in m["test_errors"]["values"]),
            "val accuracy % (mean)": round(100 * m["val_accuracy"]["mean"], 2),
        }
        for name, m in report["models"].items()
    ]


def render_markdown(report: dict, plot: str | None = None, png: bytes | None = None) -> str:
    """The report as Markdown; the plot linked by file name, or embedded (``png``) for a Prefect artifact."""
    d, s = report["distill"], report["data"]["splits"]
    seeds = report["seeds"]
    rows = next(iter(report["models"].values()))["test_rows"]
    lines = [
        f"# Classic KD report: {report['run']}",
        "",
        f"Data: `{report['data']['source']}`, splits train {s['train']} / val {s['val']} / test {s['test']}. "
        f"Distillation: T = {d['temperature']}, α = {d['alpha']} (weight of the hard-label term). "
        f"Mean ± sample standard deviation over {len(seeds)} seeds {seeds}; errors out of {rows} test rows.",
        "",
        "| model | parameters | teacher / model size | test accuracy % | test errors | errors per seed "
        "| val accuracy % |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in report["models"].items():
        per = " ".join(str(v) for v in m["test_errors"]["values"])
        lines.append(
            f"| {name} | {m['params']:,} | {m['teacher_size_ratio']}× | {_pm(m['test_accuracy'], 100)} | "
            f"{_pm(m['test_errors'], digits=1)} | {per} | {_pm(m['val_accuracy'], 100)} |"
        )
    verdict = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    n = len(seeds)
    lines += [
        "",
        f"- KD student beats the hard-label student of the same size (mean test errors): "
        f"{verdict(report['kd_beats_hard_label'])}; on {report['seeds_kd_beats_hard_label']} of {n} seeds (paired)",
        f"- Ensemble teacher beats the single teacher (mean test errors): {verdict(report['ensemble_beats_teacher'])}; "
        f"on {report['seeds_ensemble_beats_teacher']} of {n} seeds",
        "",
    ]
    if png is not None:
        import base64

        lines += [f"![test accuracy per model](data:image/png;base64,{base64.b64encode(png).decode()})", ""]
    elif plot is not None:
        lines += [f"![test accuracy per model]({plot})", ""]
    return "\n".join(lines)


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")  # off-screen: flows run without a display
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def plot_models(report: dict) -> bytes:
    """Test accuracy per model: the mean as a bar with the standard deviation, each seed as a dot."""
    fig, ax = _figure(6.5, 3.6)
    names = list(report["models"])
    for i, name in enumerate(names):
        acc = report["models"][name]["test_accuracy"]
        ax.bar(i, 100 * acc["mean"], yerr=100 * acc["std"], color="#9ecae1", capsize=4)
        ax.plot([i] * len(acc["values"]), [100 * v for v in acc["values"]], "o", color="#08519c", ms=4)
    low = min(100 * v for m in report["models"].values() for v in m["test_accuracy"]["values"])
    ax.set_ylim(max(0.0, low - 2), 100)
    ax.set_xticks(range(len(names)), [f"{n}\n{report['models'][n]['params']:,} params" for n in names], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        f"{report['run']}: T = {report['distill']['temperature']}, α = {report['distill']['alpha']}, "
        f"{len(report['seeds'])} seeds",
        fontsize=10,
    )
    return _png(fig)


def summarize_sweep(
    run_name: str, data_manifest: dict, references: dict[int, dict[str, dict]], points: list[dict]
) -> dict:
    """``references``: seed -> name -> {params, val, test} for the fixed models (single teacher, ensembles,
    hard-label student); ``points``: one per trained student, {seed, ensemble, alpha, temperature, params,
    val, test}. The grid gives each (ensemble, alpha, temperature) its spread over seeds."""
    names = list(next(iter(references.values())))
    cells: dict[tuple, list[dict]] = {}
    for p in points:
        cells.setdefault((p["ensemble"], p["alpha"], p["temperature"]), []).append(p)
    grid = [{"ensemble": k, "alpha": a, "temperature": t, **model_stats(ps)} for (k, a, t), ps in sorted(cells.items())]
    return {
        "run": run_name,
        "data": {"source": data_manifest["source"], "splits": data_manifest["splits"]},
        "seeds": list(references),
        "references": {n: model_stats([r[n] for r in references.values()]) for n in names},
        "grid": grid,
        # chosen on the validation split, so that its test accuracy is an honest estimate; every tie is kept
        # (a small validation split often cannot tell settings apart, and that should show)
        "best_on_val": [
            g for g in grid if g["val_accuracy"]["mean"] >= max(h["val_accuracy"]["mean"] for h in grid) - 1e-9
        ],
    }


def sweep_table_rows(sweep: dict) -> list[dict]:
    return [
        {
            "ensemble size": g["ensemble"],
            "alpha": g["alpha"],
            "T": g["temperature"],
            "test accuracy % (mean)": round(100 * g["test_accuracy"]["mean"], 2),
            "test accuracy % (std)": round(100 * g["test_accuracy"]["std"], 2),
            "test errors (mean)": round(g["test_errors"]["mean"], 2),
            "val accuracy % (mean)": round(100 * g["val_accuracy"]["mean"], 2),
        }
        for g in sweep["grid"]
    ]


def render_sweep_markdown(sweep: dict, plot: str | None = None, png: bytes | None = None) -> str:
    s, seeds = sweep["data"]["splits"], sweep["seeds"]
    lines = [
        f"# Classic KD sweep: {sweep['run']}",
        "",
        f"Data: `{sweep['data']['source']}`, splits train {s['train']} / val {s['val']} / test {s['test']}. "
        f"Mean ± sample standard deviation over {len(seeds)} seeds {seeds}.",
        "",
        "| reference | parameters | test accuracy % | test errors | val accuracy % |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in sweep["references"].items():
        lines.append(
            f"| {name} | {m['params']:,} | {_pm(m['test_accuracy'], 100)} | {_pm(m['test_errors'], digits=1)} "
            f"| {_pm(m['val_accuracy'], 100)} |"
        )
    lines += [
        "",
        "| teacher ensemble size | α | T | test accuracy % | test errors | val accuracy % |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for g in sweep["grid"]:
        lines.append(
            f"| {g['ensemble']} | {g['alpha']} | {g['temperature']} | {_pm(g['test_accuracy'], 100)} | "
            f"{_pm(g['test_errors'], digits=1)} | {_pm(g['val_accuracy'], 100)} |"
        )
    best = sweep["best_on_val"]
    lines += [
        "",
        f"Best on the validation split (mean val accuracy {_pm(best[0]['val_accuracy'], 100)} %"
        + (f", {len(best)} settings tied" if len(best) > 1 else "")
        + "):",
        "",
    ]
    lines += [
        f"- ensemble {b['ensemble']}, α = {b['alpha']}, T = {b['temperature']}: test accuracy "
        f"{_pm(b['test_accuracy'], 100)} %, {_pm(b['test_errors'], digits=1)} errors"
        for b in best
    ]
    lines.append("")
    if png is not None:
        import base64

        lines += [f"![student accuracy vs T](data:image/png;base64,{base64.b64encode(png).decode()})", ""]
    elif plot is not None:
        lines += [f"![student accuracy vs T]({plot})", ""]
    return "\n".join(lines)


def plot_sweep(sweep: dict) -> bytes:
    """Student test accuracy vs T (log axis), one line per (ensemble size, α) with the spread over seeds;
    the hard-label student, the single teacher and the largest ensemble as horizontal references."""
    fig, ax = _figure(7.5, 4.5)
    lines: dict[tuple, list[dict]] = {}
    for g in sweep["grid"]:
        lines.setdefault((g["ensemble"], g["alpha"]), []).append(g)
    for (k, alpha), gs in lines.items():
        ax.errorbar(
            [g["temperature"] for g in gs],
            [100 * g["test_accuracy"]["mean"] for g in gs],
            yerr=[100 * g["test_accuracy"]["std"] for g in gs],
            marker="o",
            ms=4,
            capsize=3,
            label=f"KD student, teacher ensemble {k}, α={alpha}",
        )
    refs = sweep["references"]
    ensembles = [n for n in refs if n.startswith("ensemble")]
    styles = {"hard-label student": ("black", "--"), "teacher": ("tab:gray", ":")}
    if ensembles:
        styles[max(ensembles, key=lambda n: int(n.split()[-1]))] = ("tab:red", ":")
    for name, (color, style) in styles.items():
        m = refs[name]["test_accuracy"]
        ax.axhline(100 * m["mean"], color=color, ls=style, label=f"{name} ({100 * m['mean']:.2f} %)")
        ax.axhspan(100 * (m["mean"] - m["std"]), 100 * (m["mean"] + m["std"]), color=color, alpha=0.08)
    ax.set_xscale("log")
    temps = sorted({g["temperature"] for g in sweep["grid"]})
    ax.set_xticks(temps, [f"{t:g}" for t in temps])
    ax.minorticks_off()  # a log axis labels its minor ticks "2×10⁰"; the swept values are the ticks
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{sweep['run']}: student test accuracy vs T ({len(sweep['seeds'])} seeds, ± std)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)
