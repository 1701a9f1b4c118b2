"""The run report: is each student good enough to ship, what does it cost to run, and what did distillation
buy — teacher and students side by side, as JSON (for machines), Markdown (for people) and PNG plots."""

from __future__ import annotations

import base64

from kdflow.reporting import cost_report, topk_report
from kdflow.reporting.baseline import baseline_student, gap_closure, start_of
from kdflow.reporting.floor import floor_gaps, floor_table
from kdflow.reporting.ledger import section as ledger_section
from kdflow.reporting.quality_metric import QUALITY, metric_of, quality_key, quality_notes
from kdflow.reporting.training_data import training_data_lines

# Deployment figures as (key, column title, how a value is written); ratios to the teacher follow each.
REPORT_JSON, REPORT_MD = "report.json", "report.md"  # at the top of the run folder, rewritten every run

COST_COLUMNS = [
    ("params", "parameters", lambda v: f"{v:,}"),
    ("flops_per_token", "FLOPs / token", lambda v: si_number(v)),
    ("size_bytes", "size on disk", lambda v: _bytes(v)),
    ("peak_memory_bytes", "peak memory", lambda v: _bytes(v)),
    ("latency_ms_per_token", "latency ms / token", lambda v: f"{v:.3g}"),
    ("throughput_tokens_per_s", "throughput tokens / s", lambda v: f"{v:,.0f}"),
]


def si_number(v: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.3g}"


def _bytes(v: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.0f} B"


def base_name(name: str) -> str:
    """``seq-kd@2`` -> ``seq-kd`` (the recipe's student name, before ``run.seeds`` expanded it)."""
    return name.rsplit("@", 1)[0]


KD_SETTINGS = [("alpha", "α"), ("beta", "β"), ("lmbda", "λ"), ("temperature", "T"), ("weight", "weight")]


def trained_on(m: dict) -> str:
    """What a student learnt from, for the tables: its data, and the KD loss where there is one."""
    if m.get("quantized"):  # a post-training quantized copy: what its source learnt from, then the quantization
        return (
            f"{trained_on({k: v for k, v in m.items() if k != 'quantized'})}; weights {m['quantized']} after training"
        )
    if not m.get("kd"):
        return m["data"]
    # Each KD method reports its own settings (kdflow/config/kd.py, ``summary``): offline α and T, online β, λ and
    # T, feature the loss and its weight.
    knobs = ", ".join(f"{symbol} {m[key]:g}" for key, symbol in KD_SETTINGS if key in m)
    return f"{m['data']} + {m['kd']} {m.get('divergence') or m.get('feature')} ({knobs})"


def seed_summary(students: dict[str, dict], teacher: dict, key: str = "accuracy") -> dict[str, dict]:
    """Per recipe student trained with several seeds (``name@seed``): the mean of the quality metric ``key``
    (``<key>_mean``), its sample standard deviation, min and max over the seeds, and the gap closed by the mean over
    the baseline's mean. Empty when no student was trained with more than one seed."""
    groups: dict[str, list[str]] = {}
    for name in students:
        groups.setdefault(base_name(name), []).append(name)
    if all(len(names) < 2 for names in groups.values()):
        return {}
    out = {}
    for base, names in groups.items():
        values = [students[n][key] for n in names]
        mean = sum(values) / len(values)
        std = (sum((a - mean) ** 2 for a in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        out[base] = {
            "seeds": [students[n].get("seed") for n in names],
            key: values,
            f"{key}_mean": mean,
            f"{key}_std": std,
            f"{key}_min": min(values),
            f"{key}_max": max(values),
            "trained_on": trained_on(students[names[0]]),
        }
    baseline = next((b for b, names in groups.items() if baseline_student({n: students[n] for n in names})), None)
    for base, g in out.items():
        g["gap_closure_of_means"] = (
            None if baseline is None else gap_closure(g[f"{key}_mean"], out[baseline][f"{key}_mean"], teacher[key])
        )
    return out


def ratios(model: dict, teacher: dict) -> dict:
    """model / teacher for every deployment figure both have."""
    return {k: model[k] / teacher[k] for k, _, _ in COST_COLUMNS if model.get(k) is not None and teacher.get(k)}


JUDGE_OFF = {"status": "not run", "reason": "the recipe sets no evaluation.judge"}


def build_report(
    run_name: str,
    teacher: dict,
    students: dict[str, dict],
    curation: dict | None,
    deployment: dict | None = None,
    lm_eval: dict | None = None,
    judge: dict | None = None,
) -> dict:
    """``teacher`` and each student: their metrics, with at least accuracy (or, on instruction data, rouge_l: the
    quality metric, ``quality_key``) and params (each student also its ``data``); ``deployment``: {"machine",
    "settings", "flops_formula"} of the deployment stage; ``judge``: {"judge", "split", "questions", "win_rates":
    {student: win_rate(...)}} of the judge stage, None when the recipe has no judge."""
    seeded = any("@" in name for name in students)
    baseline = baseline_student(students)
    key = quality_key(teacher)
    out = {}
    for name, m in students.items():
        own = baseline_student(
            students, m.get("seed") if seeded else None, start=start_of(students, name), trained_as=m
        )
        closed = None if own is None else gap_closure(m[key], students[own][key], teacher[key])
        compression = round(teacher["params"] / m["params"], 1) if teacher.get("params") else None  # API: unknown
        out[name] = {
            **m,
            "compression": compression,
            "gap_closure": closed,
            "gap_baseline": own,
            "vs_teacher": ratios(m, teacher),
        }
        if judge is not None:
            out[name] |= {"judge_win_rate": judge["win_rates"][name]["win_rate"], "judge": judge["win_rates"][name]}
    if teacher.get("imported"):
        note = "not defined: the teacher is known only by its imported logit dataset and was not evaluated here"
    elif baseline is None:
        note = "not applicable: no student is trained on gold data only (recipe `data: gold`) to serve as the baseline"
    elif gap_closure(1.0, students[baseline][key], teacher[key]) is None:
        better = "more accurate" if key == "accuracy" else f"higher on {QUALITY[key][0]}"
        note = f"not defined: the teacher is no {better} than the baseline `{baseline}`"
    else:
        note = f"(student − {baseline}) / (teacher − {baseline}) on {QUALITY[key][0]}"
        if seeded:
            note = (
                f"(student − {base_name(baseline)}) / (teacher − {base_name(baseline)}) on {QUALITY[key][0]}, each "
                "student against the baseline trained with its own seed"
            )
    return {
        "run": run_name,
        "teacher": teacher,
        "students": out,
        "gap_closure": {"baseline": baseline, "metric": key, "note": note},
        "floor_gaps": floor_gaps(teacher, students, key),
        "seeds": seed_summary(students, teacher, key),
        "curation": curation,
        "deployment": deployment,
        "lm_eval": lm_eval or {"status": "off"},
        "judge": JUDGE_OFF
        if judge is None
        else {"status": "done", **{k: v for k, v in judge.items() if k != "win_rates"}},
    }


# ---- Markdown ----------------------------------------------------------------------------------------


def _num(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def teacher_source(teacher: dict) -> str:
    """What the teacher row says it is: trained here on gold, an API model, or a model it was given (a GGUF file,
    dequantized, or a folder / hub id)."""
    if teacher.get("api"):
        return f"API model {teacher['model']}"
    return teacher.get("origin") or "gold"


def report_models(report: dict) -> dict[str, dict]:
    """The models the tables and plots show: the teacher (unless only its imported logits are here), the students."""
    if report["teacher"].get("imported"):
        return dict(report["students"])
    return {"teacher": {**report["teacher"], "data": teacher_source(report["teacher"])}, **report["students"]}


def _judged(report: dict) -> bool:
    return (report.get("judge") or JUDGE_OFF)["status"] == "done"


def quality_table(report: dict) -> list[str]:
    models = report_models(report)
    has_pass = any(m.get("pass_at_k") is not None for m in models.values())
    k = next((m["k"] for m in models.values() if m.get("k")), None)
    key = metric_of(report)
    title, fmt = QUALITY[key]
    head = [
        "model",
        "trained on",
        title,
        *([f"pass@{k}"] if has_pass else []),
        "gap closed",
        "perplexity",
        "top-1 agreement",
        "KL(teacher ‖ model)",
        *(["judge win rate vs teacher"] if _judged(report) else []),
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, m in models.items():
        if name == "teacher":
            closed = "1 (teacher)"
        elif m.get("gap_baseline") == name:  # the baseline the others of its start (and seed) are measured against
            closed = "0 (baseline)"
        else:
            closed = _num(m.get("gap_closure"), ".2f")
        cells = [
            name,
            trained_on(m),
            _num(m[key], fmt),
            *([_num(m.get("pass_at_k"), ".3f")] if has_pass else []),
            closed,
            _num(m.get("perplexity"), ".3f"),
            _num(m.get("agreement"), ".3f"),
            _num(m.get("kl"), ".4f"),
        ]
        if _judged(report):
            cells.append("(reference)" if name == "teacher" else _num(m.get("judge_win_rate"), ".3f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def cost_table(report: dict) -> list[str]:
    settings = (report.get("deployment") or {}).get("settings", {})
    titles = [
        t.replace("tokens / s", f"tokens / s (batch {settings['throughput_batch']})") if settings else t
        for _, t, _ in COST_COLUMNS
    ]
    titles = [t.replace("latency ms / token", "latency ms / token (batch 1)") for t in titles]
    lines = ["| model | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(COST_COLUMNS)]
    for name, m in report_models(report).items():
        ratio = m.get("vs_teacher", {})
        cells = []
        for key, _, fmt in COST_COLUMNS:
            if m.get(key) is None:
                cells.append("—")
            else:
                cells.append(fmt(m[key]) + ("" if name == "teacher" or key not in ratio else f" ({ratio[key]:.2g}×)"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def notes(report: dict) -> list[str]:
    """How every figure of the report was measured: quality (``quality_metric.quality_notes``), the gap closed, the
    judge, cost."""
    return [
        *quality_notes(report),
        f"- **Gap closed**: {report['gap_closure']['note']}.",
        *judge_notes(report),
        *deployment_notes(report),
    ]


def deployment_notes(report: dict) -> list[str]:
    """How cost was measured, and each figure that could not be had, with why."""
    t, out = report["teacher"], []
    dep = report.get("deployment")
    if dep:
        s, mc = dep["settings"], dep["machine"]
        context = next((m["context"] for m in report_models(report).values() if m.get("context") is not None), "?")
        out += [
            f"- **FLOPs / token** (forward, one generated token, analytic from the config): {dep['flops_formula']}; "
            f"here c = the mean context of the latency run ({context} keys).",
            "- **Size on disk**: the weight files. **Peak memory**: live tensors while generating "
            f"{s['throughput_batch']} × {s['latency_tokens']} tokens (weights, KV cache, activations; "
            "torch's allocator "
            "on a GPU, its profiler's allocation records on a CPU); the Python/torch runtime (the same for every "
            "model) is not counted.",
            f"- **Latency**: wall time per generated token at batch 1 ({s['latency_tokens']} tokens after a "
            "one-question "
            f"prompt, prefill included); **throughput**: {s['throughput_batch']} × {s['latency_tokens']} tokens / wall "
            f"time. Median of {s['repeats']} runs; all models measured back to back, alternating, in one stage run on "
            f"{mc['device']} ({mc['cpu_count']} CPUs; torch {mc['torch']}, {mc['torch_threads']} thread(s)).",
            *([] if t.get("api") or t.get("imported") else ["- Ratios in parentheses: model / teacher."]),
        ]
    for name, m in report_models(report).items():  # a figure that could not be had says why ("—" in the tables)
        out += [
            f"- {name}: {key.removesuffix('_skipped')} not measured: {why}"
            for key, why in m.items()
            if key.endswith("_skipped") and not (t.get("api") and why == t.get("weights"))
        ]  # said once above
    return out


def judge_notes(report: dict) -> list[str]:
    j = report.get("judge") or JUDGE_OFF
    if j["status"] != "done":
        return [
            "- **Judge win rate vs teacher**: not run (set `evaluation.judge` in the recipe to have an LLM judge "
            "compare each student's answers with the teacher's)."
        ]
    who = j["judge"]
    out = [
        f"- **Judge win rate vs teacher**: `{who['model']}` ({who['backend']}, template `{who['template']}`) compared "
        f"each student's greedy answer with the teacher's on the first {j['questions']} questions of the "
        f"`{j['split']}` split, each pair twice with the answers' places swapped (a judge that favours a place "
        "scores ½); win 1, tie ½, loss 0, over the verdicts it could parse. 0.5 = as good as the teacher."
    ]
    for name, s in report["students"].items():  # nested by 4 spaces: Python-Markdown needs 4, CommonMark takes it
        c = s.get("judge") or {}
        out.append(
            f"    - {name}: {c.get('wins', 0)} wins, {c.get('ties', 0)} ties, {c.get('losses', 0)} losses; "
            f"{c.get('unparsed', 0)} replies without a verdict, {c.get('failed', 0)} requests failed; "
            f"{c.get('consistent_pairs', 0)} of {c.get('pairs_parsed', 0)} questions judged alike in both orders."
        )
    return out


def summary(report: dict) -> list[str]:
    """One line per student: its quality (accuracy, or ROUGE-L) against the teacher's, the gap it closed, and what it
    saves."""
    t, baseline = report["teacher"], report["gap_closure"]["baseline"]
    key = metric_of(report)
    title, fmt = QUALITY[key]
    lines = []
    for name, s in report["students"].items():
        share = f" ({s[key] / t[key]:.0%} of the teacher's)" if t[key] else ""
        versus = "" if t[key] is None else f" vs the teacher's {t[key]:{fmt}}{share}"  # None: an imported dataset's
        line = f"- **{name}** (trained on {trained_on(s)}): {title} {s[key]:{fmt}}{versus}"
        if s.get("gap_baseline") != name and s.get("gap_closure") is not None:
            line += f"; closes {s['gap_closure']:.0%} of the gap over `{s.get('gap_baseline') or baseline}`"
        r = s.get("vs_teacher", {})
        costs = [
            f"{r[k]:.2g}× the {what}"
            for k, what in (
                ("params", "parameters"),
                ("latency_ms_per_token", "latency"),
                ("throughput_tokens_per_s", "throughput"),
            )
            if k in r
        ]
        lines.append(line + (f"; {', '.join(costs)}." if costs else "."))
    return lines


def seeds_table(report: dict) -> list[str]:
    """Mean and spread over seeds, per recipe student (only when ``run.seeds`` trained several)."""
    seeds = report.get("seeds") or {}
    if not seeds:
        return []
    key = metric_of(report)
    title, fmt = QUALITY[key]
    lines = [
        "## Over seeds",
        "",
        f"| student | trained on | seeds | {title} mean ± sd | min – max | gap closed (means) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for base, g in seeds.items():
        lines.append(
            f"| {base} | {g['trained_on']} | {', '.join(str(x) for x in g['seeds'])} | "
            f"{g[f'{key}_mean']:{fmt}} ± {g[f'{key}_std']:{fmt}} | {g[f'{key}_min']:{fmt}} – "
            f"{g[f'{key}_max']:{fmt}} | {_num(g['gap_closure_of_means'], '.2f')} |"
        )
    return lines + [
        "",
        "sd: sample standard deviation over the seeds. Gap closed (means): (mean − baseline's mean) / "
        "(teacher − baseline's mean).",
        "",
    ]


def on_policy_lines(report: dict) -> list[str]:
    """What each on-policy student's training took: tokens it sampled, tokens the teacher scored, where the time
    went (from its manifest's ``on_policy``)."""
    rows = {name: s["on_policy"] for name, s in report["students"].items() if s.get("on_policy")}
    if not rows:
        return []
    lines = [
        "## On-policy training",
        "",
        "| student | teacher scoring | tokens sampled | tokens scored | sample s | "
        "score s | train s | teacher s | on / off-policy batches |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in rows.items():
        total = max(a["sample_s"] + a["score_s"] + a["train_s"], 1e-9)
        share = lambda k: f"{a[k]:.1f} ({a[k] / total:.0%})"
        scoring = a.get("teacher_backend", "—") + (", overlap" if a.get("overlap") else "")
        teacher = f"{a['teacher_s']:.1f}" if "teacher_s" in a else "—"  # accounted since overlap came
        lines.append(
            f"| {name} | {scoring} | {a['student_tokens_sampled']:,} | {a['teacher_tokens_scored']:,} | "
            f"{share('sample_s')} | {share('score_s')} | {share('train_s')} | {teacher} | "
            f"{a['on_policy_batches']} / {a['off_policy_batches']} |"
        )
    return lines + [
        "",
        "Sample: the student's generate; score: the time training waited for the teacher's top-k of "
        "exactly those tokens, in its own process or on a vLLM server (the round trip included); train: "
        "the rest of each optimizer step (forward, backward, update); teacher: the teacher's round trips "
        "themselves — the same as score, except under overlap, where the teacher scores the next batch "
        "while the student trains (its samples one step old) and only the wait counts as score. Off-policy "
        "batches are cached rows of the logit cache (lmbda < 1).",
        "",
    ]


def lm_eval_lines(lm_eval: dict) -> list[str]:
    status = lm_eval.get("status", "off")
    if status == "off":
        return ["lm-evaluation-harness: off (set `evaluation.lm_eval.enabled: true` in the recipe, on a GPU)."]
    if status == "skipped":
        return [f"lm-evaluation-harness: **skipped**: {lm_eval['reason']}."]
    metrics = sorted({(task, m) for r in lm_eval["results"].values() for task, ms in r.items() for m in ms})
    lines = ["| model | " + " | ".join(f"{task} {m}" for task, m in metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, r in lm_eval["results"].items():
        lines.append(f"| {name} | " + " | ".join(_num(r.get(task, {}).get(m), ".3f") for task, m in metrics) + " |")
    limit = f", first {lm_eval['limit']} questions per task" if lm_eval.get("limit") else ""
    return [f"lm-evaluation-harness ({', '.join(lm_eval['tasks'])}{limit}):", "", *lines]


def render_markdown(report: dict, images: dict[str, str] | None = None) -> str:
    """The report as Markdown. ``images``: plot title -> where to find it (a file name next to report.md,
    or a ``data:`` URI to embed it in a Prefect artifact)."""
    c = report["curation"]
    lines = [
        f"# kdflow report: {report['run']}",
        "",
        *summary(report),
        "",
        "## Quality: is the student good enough to ship?",
        "",
        *quality_table(report),
        "",
        *floor_table(report, QUALITY[metric_of(report)][0]),
        *seeds_table(report),
        *on_policy_lines(report),
        *topk_report.lines(report),
        "## Cost: what does each model take to run?",
        "",
        *cost_table(report),
        "",
        *cost_report.sections(report, report_models(report), trained_on),
        *ledger_section(report.get("ledger")),
        "## How these were measured",
        "",
        *notes(report),
        *cost_report.notes(report),
        "",
        *training_data_lines(c, report.get("logit_cache")),
        *lm_eval_lines(report.get("lm_eval") or {"status": "off"}),
        "",
    ]
    if images:
        lines += ["## Plots", ""]
        for title, src in images.items():
            lines += [f"![{title}]({src})", ""]
    return "\n".join(lines)


def table_rows(report: dict) -> list[dict]:
    """One flat row per model, for a Prefect table artifact."""
    keys = [
        metric_of(report),
        "pass_at_k",
        "gap_closure",
        "perplexity",
        "agreement",
        "kl",
        *(["judge_win_rate"] if _judged(report) else []),
        *[k for k, _, _ in COST_COLUMNS],
        "memory_bytes_per_token",
        "arithmetic_intensity",
        "energy_j_per_token",
        "energy_source",
    ]
    return [
        {"model": name, "data": m["data"], **{k: m.get(k) for k in keys}} for name, m in report_models(report).items()
    ]


def embed(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
