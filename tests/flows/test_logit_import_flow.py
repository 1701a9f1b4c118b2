"""A logit dataset from another run, imported by a recipe (``logit_cache: {import: ...}``) inside the distill flow (real
Prefect): one run captures a cache and it is exported as axolotl's KD columns; a second recipe names only those files,
the first run's teacher (for its tokenizer and as the report's reference) and two students; its offline-KD student
trains from the imported cache, nothing asks the teacher for answers, and a rerun imports nothing again."""

import json

import pytest
import yaml

from tests.conftest import assert_rerun_report

pytestmark = pytest.mark.slow


def test_a_recipe_imports_an_exported_logit_dataset_and_an_offline_student_trains_from_it(
    prefect_server, mini_recipe, tmp_path, monkeypatch
):
    from flows.capture_logits import capture_logits_flow
    from flows.distill import distill
    from kdflow.config.recipe import load_recipe
    from kdflow.logit_cache import interop
    from kdflow.logit_cache.reader import LogitCache
    from kdflow.store import run_folder
    from kdflow.store.model_folders import model_location

    raw = yaml.safe_load(mini_recipe.read_text())
    raw["logit_cache"] = {"k": 8}
    mini_recipe.write_text(yaml.safe_dump(raw))
    captured = capture_logits_flow(str(mini_recipe))  # data → teacher → answers → curated → the teacher's top-8
    assert captured.rows, "the mini teacher kept no answers: nothing to export (the import test needs rows)"
    interop.export_cache(captured.path, tmp_path / "exported", "axolotl")
    teacher = model_location(run_folder.latest(load_recipe(mini_recipe).run_dir, "teacher"))

    raw["run"]["name"] = "mini-import"
    # the cost figures are not what is tested here: one short timed run per model
    raw["evaluation"]["deployment"] = {"latency_tokens": 4, "throughput_batch": 8, "repeats": 1}
    raw["teacher"] = {"model": teacher}  # its tokenizer is the file's; the report measures the students against it
    raw["logit_cache"] = {"import": {"path": str(tmp_path / "exported"), "format": "axolotl"}}
    baseline = raw["students"][0]
    raw["students"] = [baseline, {**baseline, "name": "logit-kd", "data": "teacher", "kd": {"method": "offline"}}]
    recipe = tmp_path / "import.yaml"
    recipe.write_text(yaml.safe_dump(raw))

    report = distill(str(recipe))
    run_dir = load_recipe(recipe).run_dir
    assert set(report["students"]) == {"baseline", "logit-kd"} and report["curation"] is None
    md = (run_dir / "report.md").read_text()
    assert "none asked for (the students learnt from an imported logit dataset)" in md
    exported = tmp_path / "exported" / "data_0.parquet"
    assert f"Logit cache: imported from axolotl files `{exported}` (sha256 " in md  # which dataset, by its content
    assert report["logit_cache"]["files"][0]["file"] == str(exported)
    assert report["logit_cache"]["rows"] == captured.rows and report["logit_cache"]["k"] == 8  # from cache.json
    # a kdflow export carries its capture's cache manifest: the teacher recorded is the first run's
    assert report["logit_cache"]["teachers"] == [
        t["model"] for t in LogitCache.open(captured.path).manifest["teachers"]
    ]
    assert f"recorded as teacher `{report['logit_cache']['teachers'][0]}`" in md
    # the teacher was asked for nothing: no preflight, no answers, no curation, no capture
    assert not [s for s in ("preflight", "generate", "curate", "logit-cache") if (run_dir / s).exists()]
    imported = run_folder.latest(run_dir, interop.STAGE)
    manifest = imported.manifest()
    assert manifest["source"] == "import:axolotl" and manifest["rows"] == captured.rows
    assert [f["name"] for f in manifest["inputs"]["files"]] == ["data_0.parquet"]
    assert LogitCache.open(imported.path).row_ids == LogitCache.open(captured.path).row_ids

    students = [json.loads(m.read_text()) for m in (run_dir / "students").glob("*/manifest.json")]
    kd = next(m for m in students if m["name"] == "logit-kd")
    # its key names the imported cache, by content, and no teacher answers; it trained on every row of the cache
    assert kd["inputs"]["logits"] == {"ref": interop.STAGE, "sha256": imported.sha256}
    assert kd["inputs"]["curated"] is None and kd["rows"] == captured.rows
    history = json.loads((run_dir / "students" / kd["key"][:16] / "log_history.json").read_text())
    assert any("kd_loss" in h and "ce_loss" in h for h in history)

    def reimport(*args, **kwargs):
        raise AssertionError("the unchanged import ran again")

    monkeypatch.setattr(interop, "import_into", reimport)
    assert_rerun_report(distill(str(recipe)), report)  # every stage a cache hit, the import too
    assert len(run_folder.outputs(run_dir, interop.STAGE)) == 1
    # evaluation and the report alone, as `kdflow evaluate` reruns them: no curate output is looked for, and the
    # report names the same imported cache
    from flows.evaluate import evaluate

    again = evaluate(str(recipe))
    assert again["curation"] is None and again["logit_cache"] == report["logit_cache"]

    # The teacher not here at all (`teacher: {imported: true}`): students of a model of their own (the file's
    # tokenizer; here a copy of the first run's teacher) train from the file; nothing of the teacher is loaded or
    # evaluated, and the report says so instead of a teacher row.
    monkeypatch.undo()  # a new run folder imports the file once
    raw["run"]["name"] = "mini-import-no-teacher"
    raw["teacher"] = {"imported": True}
    raw["students"] = [{**s, "model": teacher} for s in raw["students"]]
    for s in raw["students"]:
        del s["architecture"]
    recipe.write_text(yaml.safe_dump(raw))
    alone = distill(str(recipe))
    run_dir = load_recipe(recipe).run_dir
    recorded = run_folder.latest(run_dir, "teacher").manifest()
    assert recorded["imported"] is True and recorded["weights"] is None
    assert not [s for s in ("preflight", "generate", "curate", "logit-cache") if (run_dir / s).exists()]
    assert alone["teacher"]["imported"] and alone["teacher"]["model"] == report["logit_cache"]["teachers"][0]
    assert alone["teacher"]["accuracy"] is None and alone["gap_closure"]["note"].startswith("not defined: the teacher")
    evaluated = {json.loads(m.read_text())["inputs"]["model"]["ref"] for m in (run_dir / "evaluate").glob("*/man*")}
    assert evaluated == {"students"}  # both students, and no teacher
    for name in ("baseline", "logit-kd"):
        s = alone["students"][name]
        assert s["accuracy"] is not None and s["agreement_skipped"].startswith("the teacher is known only by")
        assert s["latency_ms_per_token"] is not None and s["vs_teacher"] == {} and s["gap_closure"] is None
    md = (run_dir / "report.md").read_text()
    assert f"- **Teacher**: `{alone['teacher']['model']}`, known only by the imported logit dataset" in md
    for section in ("## Quality", "## Cost:"):  # the tables of models have no teacher row
        table = md.split(section)[1].split("\n## ")[0]
        assert "| teacher |" not in table and "| logit-kd |" in table
