"""Bad inputs found by the repeat audit (issue 23; docs/results/audit.md), each made here and answered with a clear
error or handled."""

import json
import os

import pytest

from kdflow.config import loading
from kdflow.config.data import DataSection
from kdflow.config.loading import RecipeError, load_yaml
from kdflow.config.recipe import load_recipe, parse_recipe
from kdflow.curation import verify
from kdflow.curation.verify import Verdict
from kdflow.store.data_files import DataError
from tasks.data import build_splits
from tests.conftest import MINI_RECIPE


def nested_aliases(levels: int) -> str:
    """``levels`` lists of ten aliases of the list before: 10^levels leaves if every alias were walked anew."""
    return "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, levels + 1)
    )


def test_nested_aliases_are_walked_once_each_and_a_repeated_key_under_an_anchor_is_still_found(monkeypatch):
    calls = []
    walk = loading._duplicate_key

    def counted(node, *args):
        calls.append(node)
        return walk(node, *args)

    monkeypatch.setattr(loading, "_duplicate_key", counted)
    assert set(load_yaml(nested_aliases(4), "bomb.yaml")) == {f"a{i}" for i in range(5)}
    assert len(calls) < 100  # one per distinct node (~30); walking each alias anew made 11,116 calls
    with pytest.raises(RecipeError, match=r"bomb.yaml:3: base.lr: set twice \(first at line 2\)"):
        load_yaml("base: &b\n  lr: 1\n  lr: 2\nother: *b\n", "bomb.yaml")


def test_a_recipe_of_nested_aliases_is_refused_naming_the_unknown_fields(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(MINI_RECIPE.read_text() + nested_aliases(8))  # walked anew: > 100 s
    with pytest.raises(RecipeError, match=r"bomb.yaml:\d+: a8: unknown field"):
        load_recipe(recipe)


def test_an_unquoted_yes_as_a_name_says_yaml_read_it_as_a_boolean():
    text = MINI_RECIPE.read_text().replace("name: seq-kd", "name: yes")
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "mini.yaml")
    assert "students.1.name: Input should be a valid string; YAML reads an unquoted yes/no" in str(e.value)
    assert "as the boolean True: quote the value" in str(e.value)


def test_a_folder_given_as_the_recipe_is_named_a_folder(tmp_path):
    with pytest.raises(RecipeError, match="a folder, not a recipe file: name the YAML file in it"):
        load_recipe(tmp_path)


GOOD_ROW = json.dumps({"question": "Tom has 2 apples and buys 3. How many?", "answer": "2+3=5\n#### 5"}) + "\n"


def gsm8k_folder(tmp_path, train: bytes) -> DataSection:
    (tmp_path / "train.jsonl").write_bytes(train)
    (tmp_path / "test.jsonl").write_text(GOOD_ROW)
    return DataSection(source="gsm8k", path=str(tmp_path), splits={"train": 3, "test": 1})


def test_a_file_with_fewer_rows_than_its_split_asks_is_refused_naming_both_counts(tmp_path):
    section = gsm8k_folder(tmp_path, (GOOD_ROW * 2).encode())
    with pytest.raises(DataError, match=r"train.jsonl: 2 rows, but data.splits asks 3 of 'train': lower data.splits"):
        build_splits(section)
    (tmp_path / "train.jsonl").write_text(GOOD_ROW * 3)
    assert len(build_splits(section)["train"]) == 3


def test_a_utf8_byte_order_mark_is_read_past_and_crlf_lines_are_rows(tmp_path):
    section = gsm8k_folder(tmp_path, b"\xef\xbb\xbf" + (GOOD_ROW * 3).replace("\n", "\r\n").encode())
    rows = build_splits(section)["train"]
    assert [r["answer"] for r in rows] == ["5", "5", "5"] and rows[0]["question"].startswith("Tom")


@pytest.mark.parametrize("make", ["folder", "fifo", "device"])
def test_a_split_file_that_is_no_regular_file_is_named_so_before_it_is_read(tmp_path, make):
    section = gsm8k_folder(tmp_path, GOOD_ROW.encode())
    (tmp_path / "train.jsonl").unlink()
    if make == "folder":
        (tmp_path / "train.jsonl").mkdir()
    elif make == "fifo":  # opening it to read would wait for a writer forever
        os.mkfifo(tmp_path / "train.jsonl")
    else:  # endless bytes without a newline
        (tmp_path / "train.jsonl").symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"data.splits names 'train' but .*train.jsonl is not a regular file"):
        build_splits(section)


def test_a_run_root_that_is_a_file_is_refused_at_load_naming_the_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for root in (tmp_path / "file", tmp_path / "file" / "runs"):
        text = MINI_RECIPE.read_text().replace("root: runs", f"root: {root}")
        with pytest.raises(RecipeError, match=rf"mini.yaml:5: run.root: .*{tmp_path / 'file'} is a file, not a folder"):
            parse_recipe(text, "mini.yaml")
    text = MINI_RECIPE.read_text().replace("root: runs", f"root: {tmp_path / 'new' / 'runs'}")
    assert parse_recipe(text, "mini.yaml").run.root == str(tmp_path / "new" / "runs")  # a folder to create is fine


@pytest.mark.parametrize(
    "answer, gold, verdict",
    [
        ("so #### 1e10", "1", Verdict.wrong),  # math-verify alone read the mantissa: 'correct'
        ("so #### 1e999", "1", Verdict.wrong),
        ("so #### 2e5", "200000", Verdict.correct),  # alone: 'wrong'
        ("Answer: 1.5E-3", "0.0015", Verdict.correct),
        ("so #### 1e99999", "1", Verdict.no_answer),  # no answer means it; 10^99999 is not computed
        ("so #### 3eggs", "3", Verdict.correct),  # a word after a number is no exponent
    ],
)
def test_a_teachers_answer_in_e_notation_is_judged_by_its_whole_value(answer, gold, verdict):
    assert verify.judge(answer, gold) is verdict


def test_a_top_k_wider_than_the_teachers_vocabulary_is_refused_at_load_naming_the_line(tmp_path):
    """Before, the capture stage refused it, after the teacher had been trained and had answered."""
    text = MINI_RECIPE.read_text() + "\nlogit_cache:\n  k: 49\n"
    with pytest.raises(
        RecipeError,
        match=r"mini.yaml:\d+: logit_cache.k: 49 ids per position are more than the teacher's vocabulary "
        r"of 48 tokens; keep between 1 and 48",
    ):
        parse_recipe(text, "mini.yaml")
    assert parse_recipe(text.replace("k: 49", "k: 48"), "mini.yaml").logit_cache.k == 48
