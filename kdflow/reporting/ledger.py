"""The cost ledger: what the outputs a report stands on cost to make — API tokens, device-hours, and money where the
recipe states prices (``cost:``, kdflow/config/cost.py) — per stage output, in all, and per student the cost of a point
of gap closed.

Everything comes from the manifests already in the run folder. The outputs counted are the report's models and
evaluations (and the deployment, curation and judge outputs it reads) and everything they were made from, found by
following each manifest's ``inputs`` (upstream outputs are recorded there by stage and sha256). Each output is counted
once, at what it cost when it was made, whether this flow run made it or reused it from an earlier one (the
``made_in_this_run`` flag says which; ``this_run`` totals only the former).

A student's cost (``SHARE_RULE``): every output its model and its evaluation were made from, an output shared by n of
the report's students counting 1/n to each; outputs no student's model or evaluation was made from (the deployment
measurement, the judge, an evaluation of the teacher that no student's evaluation reads) are the comparison's overhead,
in the total and in no student's cost.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from kdflow.config.cost import CostSection
from kdflow.store.outputs import MANIFEST, OutputRef, read_manifest

SHARE_RULE = (
    "a student's cost is every output its model and its evaluation were made from, an output shared by n "
    "of the report's students counting 1/n to each; outputs no student's model or evaluation was made from "
    "(the deployment measurement, a judge, an evaluation of the teacher no student's evaluation reads) are "
    "overhead: in the total, in no student's cost"
)
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class Figures:
    """What one stage output's manifest says it took. ``api``: made by calls to an API (billed by tokens; its wall
    time is waiting, not device time); ``device_s`` None: the stage records no time."""

    api: bool
    api_input_tokens: int
    api_output_tokens: int
    device_s: float | None
    work: str


def _is_api(m: dict) -> bool:
    """Whether the output was made by calling an API: the teacher's answers through one, an API teacher's evaluation,
    an API judge."""
    if m["stage"] == "generate":
        return m.get("backend") == "openai"
    if m["stage"] == "evaluate":
        return bool((m.get("metrics") or {}).get("api"))
    if m["stage"] == "judge":
        return (m.get("judge") or {}).get("backend") == "openai"
    return False


def _work(m: dict) -> str:
    """What the output is, in a few words, from the counts its manifest records."""
    stage, acct, rows = m["stage"], m.get("accounting") or {}, m.get("rows")
    if stage == "generate":
        return f"{rows or 0:,} answers, {m.get('completion_tokens', 0):,} tokens ({m.get('backend', '?')})"
    if stage == "logit-cache":
        return f"{m.get('positions', 0):,} positions, top-{m.get('k', '?')} ({m.get('source', '?')})"
    if stage == "students" and (op := m.get("on_policy")):
        return (
            f"{rows or 0:,} rows; {op.get('student_tokens_sampled', 0):,} tokens sampled, "
            f"{op.get('teacher_tokens_scored', 0):,} scored by the teacher"
        )
    if stage == "judge":
        return f"{rows or 0:,} judgements, {acct.get('requests', 0):,} requests"
    if stage == "evaluate" and rows is not None:
        return f"{rows:,} questions"
    if stage == "import-gguf":
        return f"{m.get('quantization', '?')} GGUF to {m.get('dtype', '?')}"
    if stage == "prune":
        return f"{len(m.get('kept', []))} layers kept"
    if stage in ("teacher", "students") and rows is not None:
        return f"trained on {rows:,} rows"
    if m.get("given"):
        return f"given: {m['given']}"
    return f"{rows:,} rows" if rows is not None else ""


def figures(m: dict) -> Figures:
    """A manifest's API tokens and device time. The time is the stage's own record of its work (training, generating,
    capturing, evaluating): ``seconds`` (teacher, import-gguf, logit-cache, students), ``metrics.seconds`` (evaluate),
    ``accounting.seconds`` (generate, a local judge); else the stage's wall time from asking for its output to its
    manifest, ``wall_seconds`` (data, curate, prune, deployment, ...: every stage records it)."""
    acct = m.get("accounting") or {}
    if _is_api(m):
        waited = f", {acct.get('seconds', 0):,.0f} s waiting on the API" if acct.get("seconds") else ""
        return Figures(
            True, int(acct.get("prompt_tokens", 0)), int(acct.get("completion_tokens", 0)), None, _work(m) + waited
        )
    seconds = next(
        (
            s
            for s in (
                m.get("seconds"),
                (m.get("metrics") or {}).get("seconds"),
                acct.get("seconds"),
                m.get("wall_seconds"),
            )
            if s is not None
        ),
        None,
    )
    return Figures(False, 0, 0, None if seconds is None else float(seconds), _work(m))


# ---- which outputs ---------------------------------------------------------------------------------------------


def index(run_dir: Path) -> dict[tuple[str, str], dict]:
    """Every finished output of a run folder by (stage, sha256) -> its manifest, with its ``folder`` and the names of
    every folder holding it. Outputs with the same files (one taken over by a later key, ``adopted_from``) are one
    output: the first made."""
    found: dict[tuple[str, str], dict] = {}
    for path in sorted(Path(run_dir).glob(f"[!.]*/[!.]*/{MANIFEST}")):
        m = read_manifest(path.parent)
        if m is None or "stage" not in m:
            continue
        key = (m["stage"], m["sha256"])
        names = [*found.get(key, {}).get("folders", []), path.parent.name]
        if key not in found or m.get("created_at", "") < found[key].get("created_at", ""):
            found[key] = {**m, "folder": str(path.parent)}
        found[key]["folders"] = names
    return found


# A model folder inside a stage output, named in a section by its path (``.../students/<key>/model``, as manifests
# written before 2026-12-07 hold it) or as its key sees it (``output:students/<key>/model``, model_folders.
# keyed_by_content): a student started from the pruned teacher or from another student. That output is an input too.
OUTPUT_PATH = re.compile(r"(?:^|[/:])([A-Za-z0-9._-]+)/([0-9a-f]{16})(?:/|$)")


def upstream_refs(inputs, folders: dict[tuple[str, str], tuple[str, str]]) -> list[tuple[str, str]]:
    """The (stage, sha256) of every output a manifest's ``inputs`` name: as a ref (``outputs.canonical`` writes one as
    ``{"ref": stage, "sha256": ...}``) or by the path of a folder inside it; ``folders``: (stage, key[:16]) -> (stage,
    sha256) of the run folder's outputs."""
    if isinstance(inputs, dict):
        if set(inputs) == {"ref", "sha256"}:
            return [(inputs["ref"], inputs["sha256"])]
        return [r for v in inputs.values() for r in upstream_refs(v, folders)]
    if isinstance(inputs, list):
        return [r for v in inputs for r in upstream_refs(v, folders)]
    if isinstance(inputs, str) and (match := OUTPUT_PATH.search(inputs)):
        return [folders[match.groups()]] if match.groups() in folders else []
    return []


def closure(
    roots: list[tuple[str, str]], found: dict[tuple[str, str], dict], missing: set[tuple[str, str]]
) -> set[tuple[str, str]]:
    """``roots`` and every output they were made from, transitively; outputs not in ``found`` are added to
    ``missing``."""
    folders = {(stage, name): (stage, sha) for (stage, sha), m in found.items() for name in m["folders"]}
    seen, frontier = set(), list(roots)
    while frontier:
        ref = frontier.pop()
        if ref in seen:
            continue
        if ref not in found:
            missing.add(ref)
            continue
        seen.add(ref)
        frontier += upstream_refs(found[ref].get("inputs"), folders)
    return seen


def _ref(r: OutputRef) -> tuple[str, str]:
    return (r.stage, r.sha256)


def _to_resolution(start: datetime, m: dict) -> datetime:
    """The run's start, to the resolution of the manifest's time (an older manifest has whole seconds)."""
    return start if isinstance(m.get("created_ns"), int) else start.replace(microsecond=0)


def _made_at(m: dict) -> datetime | None:
    """When the output was made: to the microsecond where the manifest has ``created_ns``, else to the second."""
    if isinstance(m.get("created_ns"), int):
        return datetime.fromtimestamp(m["created_ns"] / 1e9, tz=timezone.utc)
    try:
        return datetime.strptime(m["created_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (KeyError, ValueError):
        return None


# ---- money -----------------------------------------------------------------------------------------------------


def money(api_in: float, api_out: float, device_h: float, prices: CostSection | None) -> float | None:
    """The priced parts of a cost: API tokens at ``prices.api``, device-hours at ``prices.device``; None when neither
    part has a price."""
    if prices is None or (prices.api is None and prices.device is None):
        return None
    total = 0.0
    if prices.api is not None:
        total += api_in / 1e6 * prices.api.input_per_mtok + api_out / 1e6 * prices.api.output_per_mtok
    if prices.device is not None:
        total += device_h * prices.device.per_hour
    return total


def _sum(rows: list[dict], prices: CostSection | None, weights: list[float] | None = None) -> dict:
    weights = weights or [1.0] * len(rows)
    api_in = sum(w * r["api_input_tokens"] for r, w in zip(rows, weights))
    api_out = sum(w * r["api_output_tokens"] for r, w in zip(rows, weights))
    hours = sum(w * r["device_hours"] for r, w in zip(rows, weights) if r["device_hours"] is not None)
    return {
        "outputs": len(rows),
        "api_input_tokens": api_in,
        "api_output_tokens": api_out,
        "device_hours": hours,
        "money": money(api_in, api_out, hours, prices),
    }


# ---- the ledger ------------------------------------------------------------------------------------------------


def build_ledger(
    run_dir: Path,
    students: dict[str, list[OutputRef]],
    overhead: dict[str, list[OutputRef | None]],
    gap_closure: dict[str, float | None],
    prices: CostSection | None = None,
    since: datetime | None = None,
) -> dict:
    """The ledger as JSON. ``students``: per report student the outputs that are it (its model, its evaluation);
    ``overhead``: the other outputs the report reads, by what they are (the teacher and its evaluation, deployment,
    curation, judge; None for one the run has not);
    ``gap_closure``: each student's gap closed (0–1, None where undefined); ``since``: when this flow run started (an
    output made at or after it was made in this run; None: unknown)."""
    found, missing = index(run_dir), set()
    own = {name: closure([_ref(r) for r in refs], found, missing) for name, refs in students.items()}
    rest = [r for refs in overhead.values() for r in refs if r is not None]
    counted = set().union(*own.values(), closure([_ref(r) for r in rest], found, missing))
    # what each output the report reads is for (an evaluation's manifest does not name its model)
    named = {_ref(r): name for name, refs in [*overhead.items(), *students.items()] for r in refs if r is not None}
    start = None if since is None else since.astimezone(timezone.utc)
    rows = []
    for ref in sorted(counted, key=lambda r: (found[r].get("created_at", ""), r)):
        m, f = found[ref], figures(found[ref])
        made = _made_at(m)
        hours = None if f.device_s is None else f.device_s / SECONDS_PER_HOUR
        rows.append(
            {
                "stage": ref[0],
                "key": m["key"][:16],
                "name": m.get("name") or named.get(ref),
                "sha256": ref[1],
                "created_at": m.get("created_at"),
                "made_in_this_run": None if start is None or made is None else made >= _to_resolution(start, m),
                "api": f.api,
                "api_input_tokens": f.api_input_tokens,
                "api_output_tokens": f.api_output_tokens,
                "device_seconds": f.device_s,
                "device_hours": hours,
                "money": None
                if hours is None and not f.api
                else money(f.api_input_tokens, f.api_output_tokens, hours or 0.0, prices),
                "work": f.work,
                "students": sorted(n for n, c in own.items() if ref in c),
            }
        )
    by_ref = {(r["stage"], r["sha256"]): r for r in rows}
    per_student = {}
    for name, refs in own.items():
        mine = [by_ref[r] for r in refs]
        cost = _sum(mine, prices, [1 / len(r["students"]) for r in mine])
        per_student[name] = {**cost, **per_point(cost, gap_closure.get(name))}
    return {
        "prices": None if prices is None else prices.model_dump(),
        "since": None if start is None else start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "outputs": rows,
        "total": _sum(rows, prices),
        "this_run": _sum([r for r in rows if r["made_in_this_run"]], prices),
        "students": per_student,
        "rule": SHARE_RULE,
        "not_recorded": [f"{r['stage']} {r['key'][:8]}" for r in rows if r["device_hours"] is None and not r["api"]],
        "missing": sorted(f"{stage} (sha256 {sha[:12]})" for stage, sha in missing),
    }


def per_point(cost: dict, closed: float | None) -> dict:
    """A student's cost divided by the points of gap it closed (a point: 1 % of the teacher − baseline gap); None
    where it closed none (the baseline itself, a student no better than it, no gap defined)."""
    points = None if closed is None or not math.isfinite(closed) else 100 * closed
    if points is None or points <= 0:
        return {"gap_points": points, "device_hours_per_point": None, "money_per_point": None}
    return {
        "gap_points": points,
        "device_hours_per_point": cost["device_hours"] / points,
        "money_per_point": None if cost["money"] is None else cost["money"] / points,
    }


# ---- Markdown ----------------------------------------------------------------------------------------------------


def _tokens(v: float) -> str:
    return f"{v:,.0f}" if v else "—"


def _hours(v: float | None) -> str:
    return "not recorded" if v is None else f"{v:.3g}" if v < 1 else f"{v:,.2f}"


def _money(v: float | None, currency: str) -> str:
    if v is None:
        return "—"
    return f"{v:,.2f} {currency}" if abs(v) >= 1 else f"{v:.3g} {currency}"


def _when(flag: bool | None) -> str:
    return {True: "made in this run", False: "reused", None: "—"}[flag]


def section(ledger: dict | None) -> list[str]:
    """The report's "Cost ledger" section: a row per output, the totals, a row per student; [] without a ledger (a
    report made before it)."""
    if not ledger:
        return []
    currency = (ledger["prices"] or {}).get("currency", "")
    priced = bool(ledger["prices"] and (ledger["prices"]["api"] or ledger["prices"]["device"]))
    money_col = lambda v: [_money(v, currency)] if priced else []
    head = [
        "stage",
        "output",
        "made in this run / reused",
        "API tokens in",
        "API tokens out",
        "device-hours",
        *(["money"] if priced else []),
        "what",
    ]
    lines = [
        "## Cost ledger: what the outputs behind this report cost to make",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|---|---:|---:|---:|" + ("---:|" if priced else "") + "---|",
    ]
    for r in ledger["outputs"]:
        label = r["key"][:8] + (f" ({r['name']})" if r.get("name") else "")
        hours = "— (API)" if r["api"] else _hours(r["device_hours"])
        lines.append(
            "| "
            + " | ".join(
                [
                    r["stage"],
                    label,
                    _when(r["made_in_this_run"]),
                    _tokens(r["api_input_tokens"]),
                    _tokens(r["api_output_tokens"]),
                    hours,
                    *money_col(r["money"]),
                    r["work"],
                ]
            )
            + " |"
        )
    totals = [("**total**", ledger["total"])] + (
        [("of which made in this run", ledger["this_run"])] if ledger["since"] else []
    )
    for title, t in totals:
        lines.append(
            "| "
            + " | ".join(
                [
                    title,
                    f"{t['outputs']} outputs",
                    "",
                    _tokens(t["api_input_tokens"]),
                    _tokens(t["api_output_tokens"]),
                    _hours(t["device_hours"]),
                    *money_col(t["money"]),
                    "",
                ]
            )
            + " |"
        )
    head = [
        "student",
        "API tokens in",
        "API tokens out",
        "device-hours",
        *(["money"] if priced else []),
        "gap closed (points)",
        "device-hours / point",
        *(["money / point"] if priced else []),
    ]
    lines += ["", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, s in ledger["students"].items():
        per = s["device_hours_per_point"]
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    _tokens(s["api_input_tokens"]),
                    _tokens(s["api_output_tokens"]),
                    _hours(s["device_hours"]),
                    *money_col(s["money"]),
                    "—" if s["gap_points"] is None else f"{s['gap_points']:.1f}",
                    "—" if per is None else f"{per:.3g}",
                    *([_money(s["money_per_point"], currency)] if priced else []),
                ]
            )
            + " |"
        )
    return lines + ["", *notes(ledger), ""]


def notes(ledger: dict) -> list[str]:
    p = ledger["prices"]
    if p is None:
        prices = (
            "no prices in the recipe "
            "(add `cost: {api: {input_per_mtok, output_per_mtok}, device: {per_hour}}` for money)"
        )
    else:
        parts = [
            f"API {p['api']['input_per_mtok']:g} / {p['api']['output_per_mtok']:g} {p['currency']} per million "
            "input / output tokens"
            if p["api"]
            else "API tokens not priced (no `cost.api`)",
            f"device {p['device']['per_hour']:g} {p['currency']} per hour"
            if p["device"]
            else "device time not priced (no `cost.device`)",
        ]
        prices = "; ".join(parts)
    out = [
        f"- **Prices**: {prices}.",
        "- **Device-hours**: each stage's own record of its work (wall-clock: training, generating, capturing, "
        "evaluating) on the machine that ran it; an API stage's time is waiting, billed by its tokens instead. "
        "Each output counts once, at what it cost when it was made: *reused* ones were made by an earlier flow run "
        "and cost nothing again in this one.",
        f"- **Per student**: {ledger['rule']}. A point of gap closed: 1 % of the gap between the baseline and the "
        "teacher (see Gap closed); none for the baseline or a student that closed none.",
    ]
    if ledger["not_recorded"]:
        out.append(f"- Stages that record no time (counted as 0): {', '.join(ledger['not_recorded'])}.")
    if ledger["missing"]:
        out.append(
            f"- Outputs named as inputs but not in the run folder (not counted): {', '.join(ledger['missing'])}."
        )
    if ledger["since"] is None:
        out.append("- Made in this run or reused: unknown (the report was not written inside a flow run).")
    return out
