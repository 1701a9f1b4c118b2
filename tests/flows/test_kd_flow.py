"""White-box KD students inside the distill flow (real Prefect): the logit cache is captured, offline-KD
students train from it by row id, and with ``run.seeds`` every student runs once per seed."""

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_offline_kd_students_and_seeds_in_the_distill_flow(prefect_server, mini_recipe):
    from flows.distill import distill
    from kdflow.config.recipe import load_recipe

    raw = yaml.safe_load(mini_recipe.read_text())
    raw["run"]["seeds"] = [0, 1]
    raw["logit_cache"] = {"k": 8}
    seq_kd = raw["students"][1]
    raw["students"] = [seq_kd, {**seq_kd, "name": "logit-rkl", "kd": {"divergence": "reverse_kl", "temperature": 2.0}}]
    mini_recipe.write_text(yaml.safe_dump(raw))

    report = distill(str(mini_recipe))
    assert set(report["students"]) == {"seq-kd@0", "seq-kd@1", "logit-rkl@0", "logit-rkl@1"}
    run_dir = load_recipe(mini_recipe).run_dir
    students = {m.parent.name: m for m in (run_dir / "students").glob("*/manifest.json")}
    assert len(students) == 4
    import json

    manifests = {json.loads(m.read_text())["name"]: json.loads(m.read_text()) for m in students.values()}
    # the offline student's key names the logit cache it learnt from; the seq-KD student's does not
    assert manifests["logit-rkl@1"]["inputs"]["logits"]["ref"] == "logit-cache"
    assert manifests["seq-kd@1"]["inputs"]["logits"] is None
    history = json.loads(
        (
            run_dir
            / "students"
            / next(k for k, m in students.items() if json.loads(m.read_text())["name"] == "logit-rkl@0")
            / "log_history.json"
        ).read_text()
    )
    assert any("kd_loss" in h and "ce_loss" in h for h in history)
    assert not list((run_dir / "students").glob(".work-*"))  # work folders removed once each output is in place
