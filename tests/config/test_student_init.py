"""A student started from another student's trained model (`init: {from: student, student: NAME}`): staged
distillation, e.g. on-policy KD warm-started from offline KD. The recipe checks, the seed mapping, `--students`
taking the parent along, and on the miniature recipe a child whose weights are its parent's trained weights."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kdflow.config.loading import RecipeError
from kdflow.config.recipe import parse_recipe
from kdflow.config.student import StudentInit

ROOT = Path(__file__).resolve().parents[2]
# lr 1e-12: two Adam steps move a weight by ~2e-12, so the child's weights are its start's to 1e-9.
WARM = """  - name: warm
    data: teacher
    init: {from: student, student: seq-kd}
    training: {max_steps: 2, per_device_train_batch_size: 16, learning_rate: 1.0e-12}

evaluation:"""


def with_warm(text: str) -> str:
    return text.replace("evaluation:", WARM, 1)


def test_init_from_a_student_parses_maps_to_the_same_seed_and_takes_its_parent_along():
    r = parse_recipe(with_warm((ROOT / "tests" / "mini.yaml").read_text()))
    warm = r.students[-1]
    assert warm.init == StudentInit(**{"from": "student", "student": "seq-kd"})
    assert warm.summary()["init"] == "from the trained student seq-kd"
    runs = r.with_seeds([1, 2]).student_runs()
    assert [(s.name, s.init.student) for s in runs if isinstance(s.init, StudentInit)] == [
        ("warm@1", "seq-kd@1"),
        ("warm@2", "seq-kd@2"),
    ]
    assert [s.name for s in r.with_students(["warm"]).students] == ["seq-kd", "warm"]


@pytest.mark.parametrize("parent, why", [("warm", "is the student itself"), ("nope", "is not a student of the recipe")])
def test_a_student_started_from_itself_or_from_no_student_is_refused_naming_the_line(parent, why):
    text = with_warm((ROOT / "tests" / "mini.yaml").read_text()).replace("student: seq-kd}", f"student: {parent}}}")
    with pytest.raises(
        RecipeError,
        match=rf"<recipe>:\d+: students.2.init.student: student 'warm': init.student "
        rf"'{parent}' {why}; name a student listed before 'warm' \(baseline, seq-kd\)",
    ):
        parse_recipe(text)


def test_a_parent_listed_after_its_child_is_refused():
    text = (
        (ROOT / "tests" / "mini.yaml")
        .read_text()
        .replace(
            "  - name: seq-kd",
            "  - name: early\n    data: teacher\n    init: {from: student, student: seq-kd}\n"
            "    training: {max_steps: 2}\n  - name: seq-kd",
        )
    )
    with pytest.raises(RecipeError, match="init.student 'seq-kd' is listed after it"):
        parse_recipe(text)


@pytest.mark.slow
def test_the_child_starts_from_its_parents_trained_weights(prefect_server, mini_recipe):
    from flows.distill import distill
    from kdflow.store import run_folder

    mini_recipe.write_text(with_warm(mini_recipe.read_text()))
    report = distill(str(mini_recipe), students=["warm"])  # trains seq-kd (the parent) and warm, not baseline
    assert set(report["students"]) == {"seq-kd", "warm"}
    assert report["students"]["warm"]["init"] == "from the trained student seq-kd"
    run_dir = mini_recipe.parent / "runs" / "mini"
    parent, child = (run_folder.latest(run_dir, "students", name) for name in ("seq-kd", "warm"))
    # the child's key names the parent's trained folder by the parent's key, wherever the run folder lies
    section = json.loads((Path(child.path) / "manifest.json").read_text())["inputs"]["section"]
    assert section["model"] == f"output:students/{Path(parent.path).name}/model@{parent.sha256}"
    assert "init" not in section
    start, end = (load_file(Path(p) / "model" / "model.safetensors") for p in (parent.path, child.path))
    assert start.keys() == end.keys()
    for name in start:
        assert (start[name] - end[name]).abs().max() < 1e-9, name
