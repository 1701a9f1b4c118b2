"""The transfer-set sweep (kdflow/reporting/sweep.py, flows/kd_sweep.py): statistics and verdict on planted accuracies,
validation before any work, and the flow end to end on the miniature recipe (real Prefect)."""

import json

import pytest
import yaml

from kdflow.config.loading import RecipeError
from kdflow.config.sweep import load_sweep
from kdflow.reporting.sweep import parse_name, regime_lines, render, summarise

PLANTED = {
    # small transfer set: logit KD ahead by far more than the spread
    "seq-kd-0.03@0": 0.20,
    "seq-kd-0.03@1": 0.30,
    "seq-kd-0.03@2": 0.25,
    "logit-0.03@0": 0.60,
    "logit-0.03@1": 0.70,
    "logit-0.03@2": 0.65,
    # large: ahead by less than the spread -> no verdict
    "seq-kd-1@0": 0.90,
    "seq-kd-1@1": 0.95,
    "seq-kd-1@2": 0.85,
    "logit-1@0": 0.97,
    "logit-1@1": 0.85,
    "logit-1@2": 0.90,
}


def test_names_parse_back():
    assert parse_name("logit-fkl-T2-0.03@2") == ("logit-fkl-T2", 0.03, 2)


def test_summary_statistics_and_a_verdict_only_beyond_the_seed_spread():
    s = summarise(PLANTED, {0.03: 250, 1.0: 8000}, teacher=0.99)
    small = s["curves"]["logit"][0.03]
    assert small["mean"] == pytest.approx(0.65) and small["sd"] == pytest.approx(0.05)
    verdicts = {v["fraction"]: v for v in s["verdicts"]}
    assert (
        verdicts[0.03]["best"] == "logit" and verdicts[0.03]["beats"] and verdicts[0.03]["margin"] == pytest.approx(0.4)
    )
    assert verdicts[1.0]["margin"] == pytest.approx(0.0066667, abs=1e-6) and not verdicts[1.0]["beats"]
    lines = regime_lines(s, "seq-kd")
    assert len(lines) == 1 and "At 0.03 of the transfer set (250 rows), **logit beats seq-kd** by 0.400" in lines[0]
    md = render(s, "seq-kd", "sweep.png")
    assert "| 0.03 | 250 | 0.250 ± 0.050 (0.200 – 0.300) | 0.650 ± 0.050 (0.600 – 0.700) |" in md


def test_no_win_is_said_plainly():
    flat = {k: v for k, v in PLANTED.items() if "-1@" in k}
    assert (
        "No transfer-set size where a white-box method beats seq-kd"
        in regime_lines(summarise(flat, {1.0: 8000}, 0.99), "seq-kd")[0]
    )


def write(tmp_path, **fields):
    sweep = {
        "recipe": "recipes/demo.yaml",
        "student": "seq-kd",
        "fractions": [0.1],
        "seeds": [0, 1, 2],
        "methods": {"seq-kd": None, "logit": {"temperature": 2.0}},
        **fields,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_a_bad_sweep_fails_before_any_work_naming_the_line(tmp_path):
    assert len(load_sweep(write(tmp_path)).students()) == 6
    with pytest.raises(RecipeError, match=r"sweep.yaml:4: fractions: each fraction must be in \(0, 1\]"):
        load_sweep(write(tmp_path, fractions=[0.1, 1.5]))
    with pytest.raises(RecipeError, match="seq-KD entry"):
        load_sweep(write(tmp_path, methods={"a": {"temperature": 2.0}, "b": {"temperature": 1.0}}))
    with pytest.raises(RecipeError, match="no student named 'nope'"):
        load_sweep(write(tmp_path, student="nope")).students()
    with pytest.raises(RecipeError, match="learns from gold"):
        load_sweep(write(tmp_path, student="baseline")).students()


@pytest.mark.slow
def test_the_sweep_flow_on_the_mini_recipe(prefect_server, mini_recipe, tmp_path):
    from flows.kd_sweep import kd_sweep
    from kdflow.config.recipe import load_recipe

    raw = yaml.safe_load(mini_recipe.read_text())
    raw["logit_cache"] = {"k": 8}
    mini_recipe.write_text(yaml.safe_dump(raw))
    path = write(tmp_path, recipe=str(mini_recipe), fractions=[0.5, 1.0], seeds=[0, 1])
    summary = kd_sweep(str(path))

    assert set(summary["curves"]) == {"seq-kd", "logit"}
    assert all(len(c["accuracy"]) == 2 for curve in summary["curves"].values() for c in curve.values())
    out = load_recipe(mini_recipe).run_dir / "sweep"
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["rows"]["0.5"] * 2 == pytest.approx(saved["rows"]["1.0"], abs=1)
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG" and "## Where does white-box KD beat" in (
        out / "sweep.md"
    ).read_text()
    # at one seed and share, both methods trained on the same rows
    manifests = [json.loads(m.read_text()) for m in (out.parent / "students").glob("*/manifest.json")]
    rows = {m["name"]: m["rows"] for m in manifests}
    assert rows["seq-kd-0.5@1"] == rows["logit-0.5@1"] and len(rows) == 8
