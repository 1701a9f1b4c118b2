"""Hinton's omitted class (Hinton, Vinyals & Dean 2015, §3): the students' transfer set has no example of one
class, which the teacher did train on; does the distilled student still recognise it?

In the paper the transfer set had no 3s; the distilled net made 133 errors on the 1,010 test 3s, mostly because
its learned bias for 3 was far too low; raised by 3.5 it got 98.6 % of them right. The paper chose that 3.5 to
optimise overall accuracy on the *test* set. Here the raise is chosen the same way but on the **validation**
split (``bias_for_class``), so the test figures stay an honest estimate: it needs labelled examples of the
class there (a few dozen), never in the transfer set.

Plain torch (no Prefect). ``drop_class`` makes the transfer set; ``evaluate`` scores one student's saved logits;
``summarize`` and ``render_markdown`` give the report's section over seeds.
"""

from __future__ import annotations

import torch

from kdflow.classic.digits import Split, spread


def drop_class(
    split: Split, label: int, teacher_logits: torch.Tensor | None = None
) -> tuple[Split, torch.Tensor | None]:
    """``split`` without any row of class ``label``, and the teacher's (N, C) logits cut to the same rows (same
    order), so that soft targets stay aligned with their images."""
    keep = split.y != label
    return Split(split.x[keep], split.y[keep]), None if teacher_logits is None else teacher_logits[keep]


def raise_bias(logits: torch.Tensor, label: int, delta: float) -> torch.Tensor:
    """(N, C) logits with ``delta`` added to column ``label`` only: the same as raising that class's output bias."""
    out = logits.clone()
    out[:, label] += delta
    return out


def bias_for_class(logits: torch.Tensor, labels: torch.Tensor, label: int) -> float:
    """The raise of class ``label``'s bias (≥ 0) that maximises overall accuracy on these rows (pass the
    validation split's logits (N, C) and labels (N,), never the test split's).

    Accuracy, as a function of the raise d, changes only where some row's logit for ``label`` overtakes its best
    other logit: at d_i = max_{j≠label} z_ij − z_i,label. So the search is exact: every interval between
    consecutive thresholds is tried, at its midpoint (the raise farthest from both neighbouring thresholds). Ties
    go to the smallest raise: the least change to what the student learned.
    """
    others = logits.clone()
    others[:, label] = float("-inf")
    thresholds = torch.unique(others.max(dim=-1).values - logits[:, label])  # sorted
    thresholds = thresholds[thresholds > 0]
    candidates = [0.0]
    if len(thresholds):
        edges = thresholds.tolist()
        candidates += [(a + b) / 2 for a, b in zip([0.0] + edges[:-1], edges)][1:] + [edges[-1] + 1.0]
    correct = [int((raise_bias(logits, label, d).argmax(-1) == labels).sum()) for d in candidates]
    return candidates[correct.index(max(correct))]


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor, label: int) -> dict:
    """{"accuracy", "errors", "rows"} on the rows of class ``label`` only."""
    rows = labels == label
    errors = int((logits[rows].argmax(-1) != label).sum())
    return {"accuracy": 1 - errors / int(rows.sum()), "errors": errors, "rows": int(rows.sum())}


def overall_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def evaluate(logits: dict[str, torch.Tensor], splits: dict[str, Split], label: int) -> dict:
    """One student's figures for the omitted class, from its saved logits: the bias raise chosen on val, and on
    test the class's accuracy and the overall accuracy, as trained and with the raise."""
    delta = bias_for_class(logits["val"], splits["val"].y, label)
    test, y = logits["test"], splits["test"].y
    raised = raise_bias(test, label, delta)
    return {
        "bias": delta,
        "class": class_accuracy(test, y, label),
        "class_raised": class_accuracy(raised, y, label),
        "test_accuracy": overall_accuracy(test, y),
        "test_accuracy_raised": overall_accuracy(raised, y),
    }


def summarize(
    label: int, transfer_rows: int, per_seed: dict[int, dict[str, dict]], references: dict[int, dict[str, dict]]
) -> dict:
    """``per_seed``: seed -> student name -> ``evaluate``'s dict; ``references``: seed -> name -> the class's
    ``class_accuracy`` for models that did see the class (the teacher ensemble, the usual KD student)."""
    names = list(next(iter(per_seed.values())))
    pick = lambda name, f: spread([f(s[name]) for s in per_seed.values()])  # noqa: E731
    first = next(iter(per_seed.values()))[names[0]]
    return {
        "label": label,
        "transfer_rows": transfer_rows,
        "test_rows_of_class": first["class"]["rows"],
        "bias_chosen_on": "val",
        "seeds": list(per_seed),
        "students": {
            name: {
                "bias": pick(name, lambda m: m["bias"]),
                "class_accuracy": pick(name, lambda m: m["class"]["accuracy"]),
                "class_accuracy_raised": pick(name, lambda m: m["class_raised"]["accuracy"]),
                "class_errors": pick(name, lambda m: m["class"]["errors"]),
                "class_errors_raised": pick(name, lambda m: m["class_raised"]["errors"]),
                "test_accuracy": pick(name, lambda m: m["test_accuracy"]),
                "test_accuracy_raised": pick(name, lambda m: m["test_accuracy_raised"]),
            }
            for name in names
        },
        "references": {
            name: spread([r[name]["accuracy"] for r in references.values()]) for name in next(iter(references.values()))
        },
    }


def _pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def render_markdown(section: dict) -> str:
    """The report's omitted-class section (Markdown)."""
    c, n = section["label"], section["test_rows_of_class"]
    lines = [
        f"## Omitted class: no {c}s in the students' transfer set (Hinton et al. 2015, §3)",
        "",
        f"The teachers trained on every class; both students below trained on the {section['transfer_rows']} "
        f'training images that are not {c}s. "raised": class {c}\'s logit raised by the bias chosen to maximise '
        f"overall accuracy on the validation split (never the test split). Test figures on the {n} test {c}s "
        f"and on the whole test split; mean ± sample std over seeds {section['seeds']}.",
        "",
        f"| student (no {c}s seen) | test {c}s right % | raised: test {c}s right % | errors on {c}s per seed "
        f"(raised) | bias raise | test accuracy % | raised: test accuracy % |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in section["students"].items():
        per = " ".join(f"{a}→{b}" for a, b in zip(s["class_errors"]["values"], s["class_errors_raised"]["values"]))
        lines.append(
            f"| {name} | {_pm(s['class_accuracy'])} | {_pm(s['class_accuracy_raised'])} | {per} | "
            f"{_pm(s['bias'], 1.0, 2)} | {_pm(s['test_accuracy'], digits=2)} | "
            f"{_pm(s['test_accuracy_raised'], digits=2)} |"
        )
    refs = "; ".join(f"{name} {_pm(s)} %" for name, s in section["references"].items())
    lines += ["", f"For reference, test {c}s right by models that did see {c}s: {refs}.", ""]
    return "\n".join(lines)
