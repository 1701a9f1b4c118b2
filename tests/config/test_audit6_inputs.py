"""Bad inputs found by the sixth audit (issue 23; docs/results/audit.md, "The sixth audit"): e-notation below the float
range, references and prompts of invisible characters, `imported: true` on a routed teacher or beside other teacher
settings, and a sweep over a recipe whose teacher is only imported logits; each made here and answered with a clear
error naming the file, line and field and what to write."""

import pytest

from data import instructions
from kdflow.config.loading import RecipeError, e_notation_hint
from kdflow.config.recipe import load_recipe
from kdflow.config.sweep import load_sweep
from kdflow.store.data_files import DataError
from tests.config.test_audit5_inputs import mini
from tests.logit_cache.test_logit_import_recipe import files, without_teacher  # noqa: F401 (files: a fixture)
from tests.teacher.test_teachers import two_teachers

# ---- 1. e-notation below the smallest float -------------------------------------------------------------------


@pytest.mark.parametrize(
    "old, new, field, whole",
    [
        ("train: 40,", "train: 1e-400,", r"mini.yaml:11: data.splits.train", "whole "),
        ("learning_rate: 5.0e-3", "learning_rate: 1e-400", r"mini.yaml:16: teacher.training.learning_rate", ""),
    ],
)
def test_e_notation_below_the_float_range_is_out_of_range_not_zero(tmp_path, old, new, field, whole):
    # Before: "0 is not a whole number" (0 is one), and "write it with a dot, e.g. 0.0e+00", another number.
    with pytest.raises(RecipeError, match=rf"{field}: ") as e:
        load_recipe(mini(tmp_path, old, new))
    message = str(e.value)
    assert (
        f"out of range, below the smallest float (4.9e-324): write a larger {whole}number, or 0 if 0 is meant"
        in message
    ), message
    assert "not a whole number" not in message and "0.0e+00" not in message


def test_e_notation_hints_never_change_the_number_nor_call_a_whole_number_fractional():
    assert "below the smallest float" in e_notation_hint("-2e-324", whole=False)
    assert e_notation_hint("0e-400", whole=True).endswith("whole number, 0")  # 0 written so is 0, not out of range
    assert e_notation_hint("4e-324", whole=False).endswith("e.g. 4.9e-324")  # the smallest float, not out of range
    # as few digits as give the same float back: one digit turned 1.234e-5 into 1.2e-05
    assert e_notation_hint("1.234e-5", whole=False).endswith("e.g. 1.234e-05")
    assert e_notation_hint("3e-4", whole=False).endswith("e.g. 3.0e-04")
    # a fraction that float() rounds to 1.0 is named as written, not as "1 is not a whole number"
    hint = e_notation_hint("1.00000000000000001e0", whole=True)
    assert "1.00000000000000001e0 is not a whole number" in hint and " 1 is not" not in hint


# ---- 2. references and prompts of invisible characters -------------------------------------------------------

INVISIBLE = ["\u200b", "\u200c\u200d", "\ufeff", " \u200b\u00a0\n", "\u2060\u2028"]


@pytest.mark.parametrize("text", INVISIBLE)
def test_a_reference_of_invisible_characters_is_refused_as_empty(tmp_path, text):
    # Before: str.strip() keeps U+200B, and such a test output or transfer completion was taken as the reference.
    test, transfer = tmp_path / "s.jsonl", tmp_path / "t.jsonl"
    test.write_text(
        '{"id": "s0", "instruction": "Do 0", "instances": [{"input": "", "output": "o"}]}\n'
        f'{{"id": "s1", "instruction": "Do 1", "instances": [{{"input": "", "output": "{_json(text)}"}}]}}\n'
    )
    with pytest.raises(DataError, match=rf"{test}:2: the instance's 'output' is empty \(no visible character\)"):
        instructions.read_test(test)
    transfer.write_text(
        '{"id": "a", "prompt": "Say hi.", "completion": "hi"}\n'
        f'{{"id": "b", "prompt": "Say bye.", "completion": "{_json(text)}"}}\n'
    )
    with pytest.raises(DataError, match=rf"{transfer}:2: field 'completion' is empty \(no visible character\)"):
        instructions.read_transfer(transfer)


def test_a_prompt_or_instruction_of_invisible_characters_is_refused_as_empty(tmp_path):
    transfer, test = tmp_path / "t.jsonl", tmp_path / "s.jsonl"
    transfer.write_text(f'{{"id": "a", "prompt": "{_json(chr(0x200B))}", "completion": "hi"}}\n')
    with pytest.raises(DataError, match=rf"{transfer}:1: empty prompt in field 'prompt' \(no visible character\)"):
        instructions.read_transfer(transfer)
    test.write_text(
        f'{{"id": "s", "instruction": "{_json(chr(0xFEFF))}", "instances": [{{"input": "", "output": "o"}}]}}\n'
    )
    with pytest.raises(DataError, match=rf"{test}:1: empty prompt in field 'instruction' \(no visible character\)"):
        instructions.read_test(test)
    # visible text around or among invisible characters is text: an emoji of joined parts, a word with a soft hyphen
    transfer.write_text('{"id": "a", "prompt": "\\u200bhi", "completion": "\\ud83d\\udc69\\u200d\\ud83d\\udcbb"}\n')
    assert instructions.read_transfer(transfer)[0]["answer"] == "\U0001f469\u200d\U0001f4bb"


def _json(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in text)


# ---- 3. imported: true on a routed teacher -------------------------------------------------------------------


def routed(tmp_path, old: str, new: str):
    text = two_teachers()
    assert old in text
    path = tmp_path / "routed.yaml"
    path.write_text(text.replace(old, new, 1).replace("root: runs", f"root: {tmp_path / 'runs'}"))
    return path


SUB = "  - name: sub\n    architecture: {hidden: 64, layers: 1, heads: 2, intermediate: 128}\n    vocab_size: 48\n"
ADD = "  - name: add\n    architecture: {hidden: 64, layers: 1, heads: 2, intermediate: 128}\n    vocab_size: 48\n"


@pytest.mark.parametrize(
    "old, new, where",
    [
        (SUB, "  - name: sub\n    imported: true\n", r"routed.yaml:20: teachers.1.imported: teacher 'sub'"),
        (ADD, "  - name: add\n    imported: true\n", r"routed.yaml:15: teachers.0.imported: teacher 'add'"),
        (ADD, '  - name: add\n    imported: "yes"\n', r"routed.yaml:15: teachers.0.imported: teacher 'add'"),
        (SUB, f"{SUB}    imported: true\n", r"routed.yaml:22: teachers.1.imported: teacher 'sub'"),
    ],
)
def test_imported_is_refused_on_any_routed_teacher_at_its_line(tmp_path, old, new, where):
    # Before: the default one was refused naming teacher.imported at line 1, a field the file lacks; another loaded and
    # failed in a stage (FileNotFoundError: .../model.json).
    with pytest.raises(RecipeError, match=rf"{where}: imported: true says a teacher is only an imported logit") as e:
        load_recipe(routed(tmp_path, old, new))
    assert "each routed teacher answers its own rows" in str(e.value) and "teacher.imported" not in str(e.value)
    if "architecture" in new:  # the same teacher with imported: false is a teacher trained here
        assert not load_recipe(routed(tmp_path, old, new.replace("imported: true", "imported: false"))).teacher.imported


# ---- 4. teacher: {imported: true} beside other teacher settings ----------------------------------------------

TEACHER = (
    "teacher:\n  architecture: {hidden: 64, layers: 1, heads: 2, intermediate: 128}\n  vocab_size: 48\n"
    "  training: {max_steps: 150, per_device_train_batch_size: 32, learning_rate: 5.0e-3, logging_steps: 50}\n"
)


@pytest.mark.parametrize("setting", ["vocab_size: 48", "seed: 3", "api: false"])
def test_an_imported_teacher_refuses_every_other_setting(tmp_path, setting):
    # Before: vocab_size and seed loaded and did nothing (only truthy api, model, architecture, training, dtype were
    # refused).
    field = setting.split(":")[0]
    with pytest.raises(
        RecipeError, match=rf"mini.yaml:14: teacher: teacher.imported: true says .*remove teacher.{field} \(or set"
    ):
        load_recipe(mini(tmp_path, TEACHER, f"teacher:\n  imported: true\n  {setting}\n"))


# ---- 5. a sweep over a recipe whose teacher is only imported logits ------------------------------------------


def test_a_sweep_over_an_imported_teacher_is_refused_at_load(tmp_path, files):  # noqa: F811
    # Before: loaded; flows/kd_sweep.py read evaluations["teacher"], which an imported teacher does not have.
    recipe = tmp_path / "imported.yaml"
    recipe.write_text(without_teacher(tmp_path, files))
    load_recipe(recipe)  # the recipe itself is a valid import run
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        f"recipe: {recipe}\nstudent: logit-kd\nfractions: [1.0]\nseeds: [0, 1]\n"
        "methods: {seq-kd: null, logit: {method: offline}}\n"
    )
    with pytest.raises(RecipeError) as e:
        load_sweep(sweep)
    message = str(e.value)
    assert message.startswith(f"{recipe}:") and "teacher.imported: the sweep measures each arm against the " in message
    assert "is never evaluated, so it has none: name the teacher's model in teacher.model" in message
