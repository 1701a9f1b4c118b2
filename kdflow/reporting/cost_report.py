"""The report's answer to "what would this student cost where it will run": memory traffic and arithmetic intensity per
token, energy per token (measured or estimated, always labelled), a roofline lower bound on named devices beside the
latency measured here, and KD × quantization side by side."""

from __future__ import annotations

from typing import Callable

from kdflow.reporting.quality_metric import QUALITY, metric_of


def _si(v: float, unit: str) -> str:
    for prefix, scale in (
        ("P", 1e15),
        ("T", 1e12),
        ("G", 1e9),
        ("M", 1e6),
        ("k", 1e3),
        ("", 1.0),
        ("m", 1e-3),
        ("µ", 1e-6),
        ("n", 1e-9),
    ):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def _us(v: float) -> str:
    return f"{v:.3g}"


def energy_cell(m: dict) -> str:
    if m.get("energy_j_per_token") is None:
        return "—"
    return f"{_si(m['energy_j_per_token'], 'J')} ({m['energy_source']})"


def traffic_table(report: dict, models: dict[str, dict]) -> list[str]:
    """One row per model (``models``: the teacher and the students): compute dtype, bytes and FLOPs per token,
    intensity, energy, the latency measured here and the roofline bound on each device profile."""
    models = {n: m for n, m in models.items() if m.get("memory_bytes_per_token") is not None}
    if not models:
        return []
    devices = [d["name"] for d in (report.get("deployment") or {}).get("devices", [])]
    head = [
        "model",
        "dtype",
        "bytes / token (weights + KV)",
        "FLOPs / byte",
        "energy / token",
        "measured ms / token",
        *[f"{d} µs / token ≥" for d in devices],
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, m in models.items():
        bound = m.get("roofline", {})
        cells = [
            name,
            m.get("compute_dtype", "?"),
            f"{_si(m['memory_bytes_per_token'], 'B')} ({_si(m['weight_bytes_per_token'], 'B')} + "
            f"{_si(m['kv_bytes_per_token'], 'B')})",
            "—" if m.get("arithmetic_intensity") is None else f"{m['arithmetic_intensity']:.3g}",
            energy_cell(m),
            "—" if m.get("latency_ms_per_token") is None else f"{m['latency_ms_per_token']:.3g}",
            *[
                _us(bound[d]["us_per_token"]) + ("" if bound[d]["compute_term"] else "*") if d in bound else "—"
                for d in devices
            ],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def quantization_table(report: dict, trained_on: Callable[[dict], str]) -> list[str]:
    """KD × quantization: each student as trained and its quantized copy, quality and cost side by side;
    ``trained_on``: how the report describes a student's training."""
    students = report["students"]
    pairs = [
        (m["quantized_from"], name)
        for name, m in students.items()
        if m.get("quantized") and m.get("quantized_from") in students
    ]
    if not pairs:
        return []
    key = metric_of(report)
    title, fmt = QUALITY[key]
    lines = [
        f"| student | trained on | weights | {title} | gap closed | perplexity | size on disk | bytes / token | "
        "latency ms / token | energy / token |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, m: dict, label: str) -> str:
        num = lambda k, f: "—" if m.get(k) is None else format(m[k], f)
        return (
            f"| {name} | {trained_on(m)} | {label} | {num(key, fmt)} | {num('gap_closure', '.2f')} | "
            f"{num('perplexity', '.3f')} | {'—' if m.get('size_bytes') is None else _si(m['size_bytes'], 'B')} | "
            f"{'—' if m.get('memory_bytes_per_token') is None else _si(m['memory_bytes_per_token'], 'B')} | "
            f"{num('latency_ms_per_token', '.3g')} | {energy_cell(m)} |"
        )

    for source, q in pairs:
        lines.append(row(source, students[source], students[source].get("compute_dtype", "as trained")))
        lines.append(row(q, students[q], students[q]["quantized"]))
    return lines


def sections(report: dict, models: dict[str, dict], trained_on: Callable[[dict], str]) -> list[str]:
    """The Markdown sections, empty for a report without traffic figures (an older run, an API teacher alone)."""
    table = traffic_table(report, models)
    quant = quantization_table(report, trained_on)
    out = []
    if quant:
        out += [
            "## KD × quantization: each student as trained and with int8 weights",
            "",
            *quant,
            "",
            "Gap closed against the baseline as trained (see Quality). Latency and energy: batch 1, this machine "
            "(see below).",
            "",
        ]
    if table:
        out += [
            "## What each model would cost where it runs: memory traffic, energy, roofline",
            "",
            *table,
            "",
            "≥: the roofline lower bound on that device (µs per token, batch 1); * = memory term alone (the device "
            "publishes no peak for this dtype).",
            "",
        ]
    return out


def notes(report: dict) -> list[str]:
    dep = report.get("deployment") or {}
    if not dep.get("traffic_formula"):
        return []
    energy = dep.get("energy") or {}
    power = dep.get("power") or {}
    counter = (
        f"measured from {energy['counter']}"
        if energy.get("counter")
        else f"no energy counter here ({energy.get('why_not', 'unknown')}), "
        f"so estimated: {power.get('watts', '?'):g} W "
        f"({power.get('source', 'no source')}) × the latency measured here"
    )
    out = [
        f"- **Bytes / token** (batch 1, read from memory once per generated token): {dep['traffic_formula']}; "
        "c = the mean context of the latency run, as for FLOPs.",
        f"- **FLOPs / byte**: {dep.get('intensity_formula', 'FLOPs/token ÷ bytes/token')}. Decoding at batch 1 sits "
        "far below every device's ridge point (peak FLOP/s ÷ bandwidth, tens to hundreds of FLOPs per byte): it is "
        "memory-bound, so bytes, not FLOPs, set the floor, and int8 weights lower it.",
        f"- **Energy / token**: {dep.get('energy_formula', '')}. Here: {counter}. A measured counter covers the whole "
        "CPU package or GPU, other processes included; `energy_source` in report.json says which each figure is.",
        f"- **Roofline**: {dep.get('roofline_formula', '')}. A lower bound, not a prediction; a model small enough to "
        "live in on-chip cache (the demo's students) can beat its DRAM term, so for them it is a scale. Device "
        "figures and their public sources:",
    ]
    for d in dep.get("devices", []):
        peaks = ", ".join(f"{k} {_si(v, 'FLOP/s')}" for k, v in d["peak_flops"].items()) or "none published"
        out.append(
            f"    - {d['name']} ({d['example']}): {_si(d['bandwidth_bytes_s'], 'B/s')} — {d['bandwidth_source']}; "
            f"peak {peaks} — {d['peak_source']}."
        )
    return out
