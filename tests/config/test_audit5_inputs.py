"""Bad recipe numbers and seeds found by the fifth audit (issue 23; docs/results/audit.md, "The fifth audit"): a sweep's
`training:` overrides and seeds, boolean seeds, and e-notation text in whole-number fields, each answered at load with
a clear error naming the file, line and field and what to write."""

import pytest

from kdflow.config.loading import RecipeError, e_notation_hint
from kdflow.config.recipe import load_recipe
from kdflow.config.sweep import load_sweep
from tests.conftest import MINI_RECIPE


def mini(tmp_path, old: str, new: str):
    text = MINI_RECIPE.read_text().replace("root: runs", f"root: {tmp_path / 'runs'}")
    assert old in text
    path = tmp_path / "mini.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def sweep(tmp_path, seeds: str = "[0, 1]", training: str = "{}"):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "recipe: tests/mini.yaml\nstudent: seq-kd\nfractions: [1.0]\n"
        f"seeds: {seeds}\nmethods: {{seq-kd: null, logit: {{temperature: 2.0}}}}\ntraining: {training}\n"
    )
    return path


@pytest.mark.parametrize(
    "training, message",
    [
        ("{learning_rate: -3.0e-3}", r"training.learning_rate: -0.003: must be > 0"),
        ("{max_steps: 0}", r"training.max_steps: 0: must be a positive number of steps"),
        ("{learning_rate: .inf}", r"training.learning_rate: inf is not a finite number"),
        ("{learning_rate: 1.0e-3, foo: 3}", r"training: .*unexpected keyword argument 'foo'; see trl.SFTConfig"),
        ('{max_steps: "1e3"}', r"training.max_steps: '1e3' is not a int \(YAML reads 1e3 as text: .* number, 1000\)"),
    ],
)
def test_a_sweeps_training_overrides_are_validated_at_load(tmp_path, training, message):
    # Before: merged with model_copy(update=...), unchecked; the first student failed in torch naming no sweep field.
    with pytest.raises(RecipeError, match=rf"sweep.yaml:6: {message}"):
        load_sweep(sweep(tmp_path, training=training))
    ok = load_sweep(sweep(tmp_path, training="{learning_rate: 1.0e-3}")).students()
    assert {s.training["learning_rate"] for s in ok} == {1.0e-3} and len(ok) == 4


def test_overrides_that_contradict_the_students_own_settings_are_refused_at_load(tmp_path):
    recipe = mini(
        tmp_path, "  - name: seq-kd\n    data: teacher\n", "  - name: seq-kd\n    data: teacher\n    dtype: float32\n"
    )
    path = sweep(tmp_path, training="{bf16: true}")
    path.write_text(path.read_text().replace("tests/mini.yaml", str(recipe)))
    with pytest.raises(
        RecipeError, match=r"sweep training: with student 'seq-kd'.*training.bf16: True contradicts dtype: float32"
    ):
        load_sweep(path)


@pytest.mark.parametrize(
    "seeds, message",
    [
        ("[0, 0]", r"seeds: seed 0 is given twice; list each seed once"),
        ("[-1]", r"seeds: seed -1 is outside 0 to 4294967295"),
        ("[true, 0]", r"seeds.0: true is a boolean, not a seed .*write the seed as a whole number"),
    ],
)
def test_a_sweeps_seeds_are_checked_as_run_seeds_are(tmp_path, seeds, message):
    with pytest.raises(RecipeError, match=rf"sweep.yaml:4: {message}"):
        load_sweep(sweep(tmp_path, seeds=seeds))


@pytest.mark.parametrize("seeds", ["[true, 0]", "[0, no]"])
def test_a_boolean_seed_is_refused_naming_the_field(tmp_path, seeds):
    # Before: [true, 0] loaded as seeds 1 and 0 (baseline@1, ...).
    path = mini(tmp_path, "  name: mini\n", f"  name: mini\n  seeds: {seeds}\n")
    with pytest.raises(RecipeError, match=r"mini.yaml:5: run.seeds.\d: (true|false) is a boolean, not a seed .*whole"):
        load_recipe(path)


def test_the_command_lines_seeds_take_whole_numbers_only(capsys):
    from flows.cli import parser

    with pytest.raises(SystemExit):  # argparse's type=int: no boolean reaches Recipe.with_seeds from the CLI
        parser().parse_args(["distill", "tests/mini.yaml", "--seeds", "true", "0"])
    assert "argument --seeds: invalid int value: 'true'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--seeds: seed 1 is given twice"):
        load_recipe(MINI_RECIPE).with_seeds([1, 1])
    with pytest.raises(ValueError, match=r"--seeds: true is a boolean, not a seed"):  # a Python caller's True
        load_recipe(MINI_RECIPE).with_seeds([True, 0])


@pytest.mark.parametrize(
    "old, new, field, number",
    [
        ("  name: mini\n", "  name: mini\n  seeds: [1e3]\n", r"run.seeds.0", "1000"),
        ("train: 40,", "train: 1e2,", r"data.splits.train", "100"),
        ("evaluation:", "logit_cache: {shard_rows: 1e3}\n\nevaluation:", r"logit_cache.shard_rows", "1000"),
    ],
)
def test_e_notation_in_a_whole_number_field_names_the_number_to_write(tmp_path, old, new, field, number):
    # Before: "Input should be a valid integer, unable to parse string as an integer", without the hint.
    with pytest.raises(
        RecipeError, match=rf"mini.yaml:\d+: {field}: .*valid integer.*\(YAML reads 1e\d as text: .* number, {number}\)"
    ):
        load_recipe(mini(tmp_path, old, new))


def test_e_notation_past_the_float_range_is_out_of_range_not_inf(tmp_path):
    # Before: "write it with a dot, e.g. inf", and `learning_rate: inf` is refused in turn.
    path = mini(tmp_path, "learning_rate: 5.0e-3", "learning_rate: 1e400")
    with pytest.raises(RecipeError, match=r"teacher.training.learning_rate: '1e400' is not a float") as e:
        load_recipe(path)
    assert "out of range, past the largest float (1.8e308): write a smaller number" in str(
        e.value
    ) and "inf" not in str(e.value)
    assert "out of range" in e_notation_hint("-1e999", whole=True)
    assert e_notation_hint("3e-4", whole=False) == "YAML reads 3e-4 as text: write it with a dot, e.g. 3.0e-04"
    assert e_notation_hint("1e25", whole=True).endswith(f"whole number, {10**25}")  # exact, not float's 1e25
    assert "1.5 is not a whole number" in e_notation_hint("1.5e0", whole=True)
    assert e_notation_hint("abc", whole=True) is None and e_notation_hint(3, whole=True) is None
