"""The cost ledger (kdflow/reporting/ledger.py): API tokens, device-hours and money per stage output, in all, and per
student per point of gap closed, read from the manifests of a run folder; its prices (kdflow/config/cost.py)."""

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import pytest

from kdflow.config.cost import CostSection
from kdflow.config.loading import RecipeError
from kdflow.config.recipe import parse_recipe
from kdflow.reporting.ledger import build_ledger, section
from kdflow.store.outputs import OutputRef
from tests.conftest import ROOT

OLD, NEW = "2026-01-01T00:00:00Z", "2026-01-02T12:00:00Z"
STARTED = datetime(2026, 1, 2, tzinfo=timezone.utc)  # the flow run: after OLD, before NEW
PRICES = CostSection(currency="EUR", api={"input_per_mtok": 1.0, "output_per_mtok": 4.0}, device={"per_hour": 2.0})


def output(
    run: Path,
    stage: str,
    sha: str,
    inputs: dict | None = None,
    created_at: str = NEW,
    folder: str | None = None,
    **figures,
) -> OutputRef:
    """A finished stage output as far as the ledger reads it: a manifest (no files)."""
    key = ((folder or sha) * 64)[:64]
    (run / stage / key[:16]).mkdir(parents=True)
    manifest = {"stage": stage, "key": key, "sha256": sha, "inputs": inputs or {}, "created_at": created_at, **figures}
    (run / stage / key[:16] / "manifest.json").write_text(json.dumps(manifest))
    return OutputRef(stage=stage, key=key, path=str(run / stage / key[:16]), sha256=sha)


def ref(r: OutputRef) -> dict:
    return {"ref": r.stage, "sha256": r.sha256}  # as outputs.canonical records an upstream output


def small_run(run: Path) -> tuple[dict, dict]:
    """A run by hand: a teacher trained 1 h, API answers (2M tokens in, 0.5M out), a logit cache (0.5 h), a baseline
    trained 0.2 h and a KD student 0.4 h, three evaluations of 0.1 h; the upstream made by an earlier run (OLD)."""
    data = output(run, "data", "d", created_at=OLD, rows=10)
    teacher = output(run, "teacher", "t", {"data": ref(data)}, OLD, rows=10, seconds=3600)
    generate = output(
        run,
        "generate",
        "g",
        {"teacher": ref(teacher), "data": ref(data)},
        OLD,
        rows=8,
        backend="openai",
        completion_tokens=500_000,
        accounting={"requests": 8, "prompt_tokens": 2_000_000, "completion_tokens": 500_000, "seconds": 90},
    )
    curate = output(run, "curate", "c", {"answers": ref(generate)}, OLD, rows=7)
    cache = output(
        run,
        "logit-cache",
        "l",
        {"curated": ref(curate), "teacher": ref(teacher)},
        OLD,
        rows=7,
        positions=700,
        k=20,
        source="hf",
        seconds=1800,
    )
    base = output(
        run, "students", "b", {"data": ref(data), "teacher": ref(teacher)}, name="baseline", rows=10, seconds=720
    )
    kd = output(
        run,
        "students",
        "k",
        {"curated": ref(curate), "data": ref(data), "teacher": ref(teacher), "logits": ref(cache)},
        folder="abcdef01",
        name="kd",
        rows=7,
        seconds=1440,
    )
    evals = {
        name: output(
            run, "evaluate", f"e-{name}", {"model": ref(model), "data": ref(data)}, rows=5, metrics={"seconds": 360}
        )
        for name, model in (("teacher", teacher), ("baseline", base), ("kd", kd))
    }
    deployment = output(run, "deployment", "dep", {"models": [ref(teacher), ref(base), ref(kd)]}, rows=3)
    students = {"baseline": [base, evals["baseline"]], "kd": [kd, evals["kd"]]}
    overhead = {
        "teacher": [teacher, evals["teacher"]],
        "deployment": [deployment],
        "curation": [curate],
        "judge": [None],
    }
    return students, overhead


GAP = {"baseline": 0.0, "kd": 0.5}


def test_a_ledger_by_hand_to_the_token_hour_and_cent(tmp_path):
    students, overhead = small_run(tmp_path)
    ledger = build_ledger(tmp_path, students, overhead, GAP, PRICES, STARTED)
    rows = {(r["stage"], r["sha256"]): r for r in ledger["outputs"]}
    assert len(rows) == 11  # data, teacher, generate, curate, cache, 2 students, 3 evaluations, deployment: once each
    g = rows[("generate", "g")]
    assert (g["api"], g["api_input_tokens"], g["api_output_tokens"], g["device_hours"]) == (
        True,
        2_000_000,
        500_000,
        None,
    )
    assert g["money"] == pytest.approx(2 * 1.0 + 0.5 * 4.0)  # tokens, not the 90 s it waited
    assert rows[("teacher", "t")]["device_hours"] == 1.0 and rows[("teacher", "t")]["money"] == pytest.approx(2.0)
    assert rows[("data", "d")]["device_hours"] is None and rows[("data", "d")]["money"] is None  # records no time
    assert rows[("evaluate", "e-kd")]["name"] == "kd"  # an evaluation is named by the model it is for
    # 1 + 0.5 + 0.2 + 0.4 + 3 × 0.1 device-hours at 2.0; 2M in at 1.0 and 0.5M out at 4.0 per million
    assert ledger["total"] == pytest.approx(
        {
            "outputs": 11,
            "api_input_tokens": 2_000_000,
            "api_output_tokens": 500_000,
            "device_hours": 2.4,
            "money": 2.4 * 2.0 + 2.0 + 2.0,
        }
    )
    # the teacher is shared by both students (½ each); generate, curate and the cache are the KD student's alone; the
    # teacher's evaluation and the deployment measurement are overhead
    base, kd = ledger["students"]["baseline"], ledger["students"]["kd"]
    assert base["device_hours"] == pytest.approx(0.5 + 0.2 + 0.1) and base["money"] == pytest.approx(0.8 * 2.0)
    assert base["api_input_tokens"] == 0 and base["gap_points"] == 0.0
    assert base["device_hours_per_point"] is None and base["money_per_point"] is None  # the baseline closes none
    assert kd["device_hours"] == pytest.approx(0.5 + 0.5 + 0.4 + 0.1)
    assert kd["money"] == pytest.approx(1.5 * 2.0 + 4.0)
    assert kd["gap_points"] == pytest.approx(50.0)
    assert kd["device_hours_per_point"] == pytest.approx(1.5 / 50) and kd["money_per_point"] == pytest.approx(7.0 / 50)
    assert base["device_hours"] + kd["device_hours"] + 0.1 == pytest.approx(ledger["total"]["device_hours"])
    assert set(ledger["not_recorded"]) == {"data dddddddd", "curate cccccccc", "deployment depdepde"}
    assert not ledger["missing"]

    md = "\n".join(section(ledger))
    assert "## Cost ledger" in md
    assert "| generate | gggggggg | reused | 2,000,000 | 500,000 | — (API) | 4.00 EUR |" in md
    assert "| **total** | 11 outputs |  | 2,000,000 | 500,000 | 2.40 | 8.80 EUR |  |" in md
    assert "| kd | 2,000,000 | 500,000 | 1.50 | 7.00 EUR | 50.0 | 0.03 | 0.14 EUR |" in md
    assert "API 1 / 4 EUR per million input / output tokens; device 2 EUR per hour" in md


def test_without_prices_the_ledger_still_counts_tokens_and_hours(tmp_path):
    students, overhead = small_run(tmp_path)
    ledger = build_ledger(tmp_path, students, overhead, GAP)
    assert ledger["prices"] is None and ledger["total"]["money"] is None
    assert ledger["total"]["device_hours"] == pytest.approx(2.4) and ledger["total"]["api_input_tokens"] == 2_000_000
    assert ledger["students"]["kd"]["device_hours_per_point"] == pytest.approx(1.5 / 50)
    assert ledger["students"]["kd"]["money_per_point"] is None
    md = "\n".join(section(ledger))
    assert "money" not in md.split("- **Prices**")[0]  # no money column
    assert "no prices in the recipe" in md

    # API prices alone: money is the API's part, and the notes say the device time is not priced
    api_only = build_ledger(tmp_path, students, overhead, GAP, CostSection(api=PRICES.api))
    assert api_only["total"]["money"] == pytest.approx(4.0)
    assert "device time not priced (no `cost.device`)" in "\n".join(section(api_only))


def test_outputs_reused_from_an_earlier_run_count_once_and_say_so(tmp_path):
    students, overhead = small_run(tmp_path)
    # the same answers taken over under a later key (outputs.StageOutput.adopt: same files, same sha256): one output
    output(
        tmp_path,
        "generate",
        "g",
        created_at=NEW,
        folder="g-adopted",
        backend="openai",
        adopted_from="g" * 64,
        accounting={"prompt_tokens": 2_000_000, "completion_tokens": 500_000},
    )
    ledger = build_ledger(tmp_path, students, overhead, GAP, PRICES, STARTED)
    made = {r["stage"] + " " + r["sha256"]: r["made_in_this_run"] for r in ledger["outputs"]}
    assert made["generate g"] is False and made["teacher t"] is False and made["students k"] is True
    assert ledger["total"]["api_input_tokens"] == 2_000_000  # not twice
    # made in this run: 2 students, 3 evaluations, the deployment measurement (0.2 + 0.4 + 0.3 device-hours)
    assert ledger["this_run"]["outputs"] == 6
    assert ledger["this_run"]["device_hours"] == pytest.approx(0.9)
    assert ledger["this_run"]["api_input_tokens"] == 0 and ledger["this_run"]["money"] == pytest.approx(1.8)
    md = "\n".join(section(ledger))
    assert "| teacher | tttttttt (teacher) | reused |" in md and "| students | abcdef01 (kd) | made in this run |" in md
    assert "| of which made in this run | 6 outputs |" in md
    # a report written outside a flow run cannot tell
    unknown = build_ledger(tmp_path, students, overhead, GAP, PRICES)
    assert {r["made_in_this_run"] for r in unknown["outputs"]} == {None}
    assert "of which made in this run" not in "\n".join(section(unknown))


def test_an_output_made_in_the_second_a_run_started_but_before_it_was_reused(tmp_path):
    """A cached rerun started in the same second as the last output of the run before: made_in_this_run compares
    the manifest's created_ns with the run's start, not two times cut to the second (a test failed on that tie)."""
    start = datetime(2026, 12, 5, 12, 0, 0, 600_000, tzinfo=timezone.utc)
    ns = int(start.timestamp() * 1e9)
    before = output(tmp_path, "students", "a", created_at="2026-12-05T12:00:00Z", created_ns=ns - 300_000_000)
    after = output(tmp_path, "students", "b", created_at="2026-12-05T12:00:00Z", created_ns=ns + 1_000)
    old = output(tmp_path, "students", "c", created_at="2026-12-05T12:00:00Z")  # a manifest from before created_ns
    ledger = build_ledger(tmp_path, {"a": [before], "b": [after], "c": [old]}, {}, {}, None, start)
    made = {r["sha256"]: r["made_in_this_run"] for r in ledger["outputs"]}
    assert made == {"a": False, "b": True, "c": True}  # to the second, as such manifests could only say


def test_an_input_missing_from_the_run_folder_is_named_not_counted(tmp_path):
    students, overhead = small_run(tmp_path)
    (tmp_path / "logit-cache" / ("l" * 16) / "manifest.json").unlink()
    ledger = build_ledger(tmp_path, students, overhead, GAP, PRICES)
    assert ledger["missing"] == ["logit-cache (sha256 l)"]
    assert ledger["total"]["device_hours"] == pytest.approx(2.4 - 0.5)


@pytest.mark.parametrize("named", ["path", "key"])
def test_a_student_started_from_another_shares_its_training(tmp_path, named):
    """A start inside a stage output (``init: {from: student}``, a pruned teacher) is an input like a ref, named by
    its folder's path (older manifests) or as its key sees it (``output:<stage>/<key>/model``)."""
    students, overhead = small_run(tmp_path)
    kd = students["kd"][0]
    start = f"{kd.path}/model" if named == "path" else f"output:students/{Path(kd.path).name}/model"
    child = output(
        tmp_path,
        "students",
        "w",
        {"section": {"model": start}, "data": {"ref": "data", "sha256": "d"}},
        name="warm",
        rows=7,
        seconds=360,
    )
    evaluation = output(tmp_path, "evaluate", "e-warm", {"model": ref(child)}, metrics={"seconds": 360})
    ledger = build_ledger(tmp_path, {**students, "warm": [child, evaluation]}, overhead, {**GAP, "warm": 0.6}, PRICES)
    shares = {r["sha256"]: r["students"] for r in ledger["outputs"]}
    assert shares["k"] == ["kd", "warm"] and shares["t"] == ["baseline", "kd", "warm"]
    # its own 0.1 + 0.1, half of its parent's 0.4, a third of the teacher's 1 h, half of generate, curate and the cache
    warm = ledger["students"]["warm"]
    assert warm["device_hours"] == pytest.approx(0.2 + 0.2 + 1 / 3 + 0.25)
    assert warm["api_input_tokens"] == pytest.approx(1_000_000)
    assert sum(s["device_hours"] for s in ledger["students"].values()) + 0.1 == pytest.approx(
        ledger["total"]["device_hours"]
    )


DEMO = (ROOT / "recipes" / "demo.yaml").read_text()


def with_cost(cost: str) -> str:
    return DEMO + "\ncost:\n" + cost


def test_a_recipe_states_prices_in_its_cost_section():
    r = parse_recipe(
        with_cost("  currency: EUR\n  api: {input_per_mtok: 0.15, output_per_mtok: 0.6}\n  device: {per_hour: 2.5}\n"),
        "c.yaml",
    )
    assert (r.cost.currency, r.cost.api.output_per_mtok, r.cost.device.per_hour) == ("EUR", 0.6, 2.5)
    assert parse_recipe(DEMO, "c.yaml").cost is None
    assert parse_recipe(with_cost("  device: {per_hour: 0}\n"), "c.yaml").cost.api is None  # each part optional


@pytest.mark.parametrize(
    "cost, field, says",
    [
        (
            "  api: {input_per_mtok: -1, output_per_mtok: 0.6}\n",
            "cost.api.input_per_mtok",
            "greater than or equal to 0",
        ),
        ("  api: {input_per_mtok: 0.1, output_per_mtok: .inf}\n", "cost.api.output_per_mtok", "not a finite number"),
        ("  device: {per_hour: .nan}\n", "cost.device.per_hour", "not a finite number"),
        ("  device: {per_hour: -0.5}\n", "cost.device.per_hour", "greater than or equal to 0"),
        ("  api: {input_per_mtok: 0.1}\n", "cost.api.output_per_mtok", "required field is missing"),
        ("  device: {per_hours: 2}\n", "cost.device.per_hours", "unknown field"),
    ],
)
def test_a_bad_price_is_a_recipe_error_naming_the_field(cost, field, says):
    text = with_cost(cost)
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "c.yaml")
    line = text.count("\n", 0, text.index(cost.strip())) + 1
    assert f"c.yaml:{line}: {field}: " in str(e.value) and says in str(e.value)


@pytest.mark.slow
def test_the_distill_flow_reports_its_ledger_and_a_price_change_reruns_nothing(prefect_server, mini_recipe):
    from flows.distill import distill

    mini_recipe.write_text(
        mini_recipe.read_text() + "\ncost:\n  device: {per_hour: 3.0}\n  api: {input_per_mtok: 1, output_per_mtok: 2}\n"
    )
    run = mini_recipe.parent / "runs" / "mini"
    first = distill(str(mini_recipe))["ledger"]
    stages = {r["stage"] for r in first["outputs"]}
    assert {"data", "teacher", "generate", "curate", "students", "evaluate", "deployment"} <= stages
    assert all(r["made_in_this_run"] for r in first["outputs"])  # a fresh run folder: everything made now
    assert first["this_run"] == first["total"] and first["total"]["device_hours"] > 0
    assert first["total"]["money"] == pytest.approx(first["total"]["device_hours"] * 3.0)  # the hf teacher: no API
    assert set(first["students"]) == {"baseline", "seq-kd"} and not first["missing"]
    assert not first["not_recorded"]  # every stage records at least its wall time (data, curate, deployment too)
    trained = {r["name"]: r for r in first["outputs"] if r["stage"] == "students"}
    assert set(trained) == {"baseline", "seq-kd"} and all(r["device_seconds"] > 0 for r in trained.values())
    report = json.loads((run / "report.json").read_text())
    assert report["ledger"] == json.loads(json.dumps(first))
    assert "## Cost ledger" in (run / "report.md").read_text()

    # new prices: no stage's key holds them, so everything is reused and only the money changes
    mini_recipe.write_text(mini_recipe.read_text().replace("per_hour: 3.0", "per_hour: 6.0"))
    second = distill(str(mini_recipe))["ledger"]
    assert not any(r["made_in_this_run"] for r in second["outputs"])
    assert [r["sha256"] for r in second["outputs"]] == [r["sha256"] for r in first["outputs"]]
    assert second["this_run"]["outputs"] == 0
    assert second["total"]["device_hours"] == first["total"]["device_hours"]
    assert second["total"]["money"] == pytest.approx(2 * first["total"]["money"])
    assert math.isfinite(second["students"]["seq-kd"]["device_hours"])
    assert "| reused |" in (run / "report.md").read_text()


def test_a_stage_with_no_record_of_its_work_is_counted_by_its_wall_time():
    from kdflow.reporting.ledger import figures

    assert figures({"stage": "deployment", "wall_seconds": 90.0}).device_s == 90.0
    assert figures({"stage": "students", "seconds": 10.0, "wall_seconds": 90.0}).device_s == 10.0  # its own first
    assert figures({"stage": "data"}).device_s is None  # made before stages recorded it: "not recorded"
