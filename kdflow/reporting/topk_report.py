"""The report's "Top-k diagnostics": per KD student trained on a teacher's top-k, what its sparse loss left out
(the teacher's kept and tail mass, the share of positions whose student top-1 lies outside the teacher's top-k) and
the KD term's size against the CE term — mean over training, first and last logging window — from its manifest's
``topk`` (kdflow/training/topk_diagnostics.py), with the values that should worry a reader flagged."""

from __future__ import annotations

# What should worry a reader (docs/methods/offline-kd.md, "Top-k diagnostics"):
TAIL_WORRY = 0.1  # the tail bucket holds over 10 % of the teacher's mass: top-k drops real signal; raise k
OUTSIDE_WORRY = 0.1  # over 10 % of the student's top-1 tokens lie where the loss sees one bucket only
RATIO_NEAR_ZERO = 0.01  # the KD term under 1 % of the CE term: the teacher barely moves the student

COLUMNS = [
    ("topk_kept_mass", "teacher kept mass", ".3f"),
    ("topk_tail_mass", "tail mass", ".3f"),
    ("top1_outside_topk", "student top-1 outside top-k", ".1%"),
    ("ce_loss", "CE", ".4g"),
    ("kd_loss", "KD", ".4g"),
    ("kd_ce_ratio", "KD / CE", ".3g"),
]


def warnings(topk: dict) -> list[str]:
    """The worrying values of a student's ``topk`` summary, judged on its last logging window (where training
    ended) and its mean, as sentences; [] when none."""
    out = []
    for when in ("mean", "last"):
        d = topk.get(when, {})
        if d.get("topk_tail_mass", 0.0) > TAIL_WORRY:
            out.append(
                f"{when}: tail mass {d['topk_tail_mass']:.3f} > {TAIL_WORRY:g}: the teacher's top-k leave "
                "out much of its distribution (raise logit_cache.k / kd.k)"
            )
        if d.get("top1_outside_topk", 0.0) > OUTSIDE_WORRY:
            out.append(
                f"{when}: the student's top-1 lies outside the teacher's top-k at "
                f"{d['top1_outside_topk']:.1%} of positions (> {OUTSIDE_WORRY:.0%})"
            )
        if d.get("kd_ce_ratio") is not None and d["kd_ce_ratio"] < RATIO_NEAR_ZERO:
            out.append(
                f"{when}: the KD term is {d['kd_ce_ratio']:.2g}× the CE term (< {RATIO_NEAR_ZERO:g}): it "
                "barely trains the student"
            )
    return out


def with_warnings(topk: dict) -> dict:
    """A manifest's ``topk`` as the report carries it: with its ``warnings``."""
    return {**topk, "warnings": warnings(topk)} if topk else {}


def lines(report: dict) -> list[str]:
    """Markdown: one small table per student whose report entry has ``topk``; [] when none has."""
    rows = {name: s["topk"] for name, s in report["students"].items() if s.get("topk")}
    if not rows:
        return []
    out = ["## Top-k diagnostics", ""]
    for name, t in rows.items():
        alpha = f"α {t['alpha']:g}, " if t.get("alpha") is not None else ""
        out += [
            f"**{name}** ({alpha}{t['logging_steps']} logging steps)",
            "",
            "| window | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
            "|---|" + "---:|" * len(COLUMNS),
        ]
        for when, label in (("mean", "mean over training"), ("first", "first"), ("last", "last")):
            d = t.get(when, {})
            step = f" (step {d['step']})" if "step" in d else ""
            out.append(f"| {label}{step} | " + " | ".join(_cell(d.get(k), fmt) for k, _, fmt in COLUMNS) + " |")
        worries = t.get("warnings", warnings(t))
        out += [""] + [f"- ⚠ {w}" for w in worries] + ([""] if worries else [])
    return out + [
        "Teacher kept mass: Σ of the teacher's top-k probabilities (T = 1), mean over the KD positions; tail mass = "
        "1 − kept, the mass the sparse loss sees as one bucket. Student top-1 outside top-k: the share of positions "
        "where "
        "the student's most likely token is none of the teacher's top-k ids. KD / CE: the KD term over the CE term, "
        "before α weights them (the mean row: of the mean terms). Worrying: a tail mass above "
        f"{TAIL_WORRY:g}, a top-1 outside share above {OUTSIDE_WORRY:.0%}, a KD term under {RATIO_NEAR_ZERO:g}× "
        "the CE (verl #7856; arXiv 2605.11182). See docs/methods/offline-kd.md.",
        "",
    ]


def _cell(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)
