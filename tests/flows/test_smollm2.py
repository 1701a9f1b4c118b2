"""The real-model path end to end, at CI's sizes: tests/smollm2_mini.yaml through the distill flow on
SmolLM2-135M-Instruct (the GGUF from the registry wheel) — import, answers, top-k capture, a pruned 2-layer student
trained 2 steps by SFT, seq-KD, offline KD and on-policy KD (from the pruned copy, and from the offline-KD student), a
student named by the GGUF file itself, the untrained pruned floor, ROUGE-L evaluation, report."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def smollm2_recipe(tmp_path) -> Path:
    from kdflow.models.smollm2 import gguf_path

    text = (ROOT / "tests" / "smollm2_mini.yaml").read_text()
    text = text.replace("root: runs", f"root: {tmp_path / 'runs'}")
    text = text.replace("models/SmolLM2-135M-Instruct.Q4_1.gguf", str(gguf_path()))
    path = tmp_path / "smollm2_mini.yaml"
    path.write_text(text)
    return path


def test_a_pruned_student_distilled_from_the_real_model_by_every_method(prefect_server, smollm2_recipe):
    from flows.distill import distill

    report = distill(str(smollm2_recipe))
    run = smollm2_recipe.parent / "runs" / "smollm2-mini"
    teacher = json.loads(next((run / "import-gguf").glob("*/manifest.json")).read_text())
    assert teacher["dequantized"] is True and teacher["params"] == 134_515_008 and teacher["quantization"] == "Q4_1"

    [pruning] = [json.loads(p.read_text()) for p in (run / "prune").glob("*/pruning.json")]
    assert pruning["select"] == "importance" and len(pruning["influence"]) == 30 and len(pruning["kept"]) == 2
    assert pruning["kept"] == sorted(sorted(range(30), key=lambda i: -pruning["influence"][i])[:2])

    students = report["students"]
    assert set(students) == {
        "pruned-2-importance",
        "sft",
        "seq-kd",
        "offline-kd",
        "on-policy",
        "on-policy-warm",
        "gguf-sft",
    }
    floor = students["pruned-2-importance"]
    assert floor["params"] == students["sft"]["params"] < report["teacher"]["params"]
    for name, m in students.items():
        assert 0.0 <= m["rouge_l"] <= 100.0, name
        assert m["kl"] >= 0.0 and 0.0 <= m["agreement"] <= 1.0, name
    assert report["teacher"]["agreement"] == 1.0
    on_policy = json.loads(
        next(
            p
            for p in (run / "students").glob("*/manifest.json")
            if json.loads(p.read_text()).get("name") == "on-policy"
        ).read_text()
    )
    assert on_policy["on_policy"]["student_tokens_sampled"] > 0

    folders = {json.loads(p.read_text()).get("name"): p.parent for p in (run / "students").glob("*/manifest.json")}
    manifests = {name: json.loads((folder / "manifest.json").read_text()) for name, folder in folders.items()}
    # the warm student starts from the offline-KD student's trained folder, the GGUF student from the teacher's import,
    # each keyed by that output's key, not by where the run folder lies
    warm_start = f"output:students/{folders['offline-kd'].name}/model@{manifests['offline-kd']['sha256']}"
    assert manifests["on-policy-warm"]["inputs"]["section"]["model"] == warm_start
    assert manifests["on-policy-warm"]["on_policy"]["student_tokens_sampled"] > 0
    [imported] = [p.parent for p in (run / "import-gguf").glob("*/manifest.json")]  # one, for teacher and student
    import_sha256 = json.loads((imported / "manifest.json").read_text())["sha256"]
    assert (
        manifests["gguf-sft"]["inputs"]["section"]["model"]
        == f"output:import-gguf/{imported.name}/model@{import_sha256}"
    )
    assert students["gguf-sft"]["params"] == report["teacher"]["params"] == 134_515_008

    # The run folder copied elsewhere (hard links: no bytes copied): `kdflow evaluate --run-dir <copy>` finds every
    # student by its key, the one started from another student too, and reports the same figures (the ninth audit's
    # #28: that student's key held its parent's absolute path, and the copy was refused as an edited recipe).
    import os
    import shutil

    from flows.evaluate import evaluate

    copy = smollm2_recipe.parent / "elsewhere" / "smollm2-mini"
    shutil.copytree(run, copy, copy_function=os.link)
    again = evaluate(str(smollm2_recipe), run_dir=str(copy))
    assert {n: (m["rouge_l"], m["kl"]) for n, m in again["students"].items()} == {
        n: (m["rouge_l"], m["kl"]) for n, m in students.items()
    }
    assert not {p.parent.name for p in (copy / "students").glob("*/manifest.json")} - {p.name for p in folders.values()}
