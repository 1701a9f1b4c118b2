"""The GSM8K loader and the math-verify checker on the real files in data/gsm8k."""

import json
import os
import re
from pathlib import Path

import pytest

from data.gsm8k import check_answer, final_answer, gold_answer, load_split
from kdflow.store.data_files import DataError

GSM8K = Path(os.environ.get("KDFLOW_GSM8K", Path(__file__).resolve().parents[2] / "data" / "gsm8k"))
needs_gsm8k = pytest.mark.skipif(
    not (GSM8K / "test.jsonl").is_file(), reason=f"GSM8K not found at {GSM8K} (set KDFLOW_GSM8K)"
)


def change_final_number(solution: str, gold: str) -> str:
    return solution.rsplit("####", 1)[0] + f"#### {int(float(gold)) + 1}"


@needs_gsm8k
def test_real_gsm8k_gold_solutions_pass_and_changed_answers_fail():
    rows = load_split(GSM8K / "test.jsonl")
    assert len(rows) == 1319
    passed = sum(check_answer(r["rationale"], r["answer"]) for r in rows)
    assert passed / len(rows) >= 0.99, f"only {passed}/{len(rows)} gold solutions verified"
    rejected = sum(not check_answer(change_final_number(r["rationale"], r["answer"]), r["answer"]) for r in rows)
    assert rejected / len(rows) >= 0.99, f"only {rejected}/{len(rows)} changed answers rejected"
    assert rows[0]["answer"] == "18" and rows[0]["id"] == "test-000000"


@needs_gsm8k
def test_train_split_loads_through_the_loader_with_calculator_annotations():
    rows = load_split(GSM8K / "train.jsonl", n=200)
    assert len(rows) == 200 and all("<<" in r["rationale"] for r in rows[:20])
    # The annotation's own result must not be taken for the answer when the '####' line is missing.
    assert check_answer("48/2 = <<48/2=24>>24 clips; total 48+24 = <<48+24=72>>72", "72")


def test_equivalent_number_forms():
    for form in ["72", "72.0", "$72", "72 dollars", "\\boxed{72}", "#### 72", "Answer: $72.00", "The answer is 72."]:
        assert check_answer(form, "72"), form
    assert gold_answer("so #### 1,234") == "1234"
    assert check_answer("#### 1,234", "1234")
    assert not check_answer("#### 73", "72") and not check_answer("\\boxed{7.2}", "72")
    assert final_answer("no final line") is None and final_answer("") is None


def test_malformed_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    good = json.dumps({"question": "q", "answer": "1+1=2\n#### 2"})
    bad.write_text(good + "\n{not json\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        load_split(bad)
    bad.write_text(good + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: missing field\(s\) \['answer'\]"):
        load_split(bad)
    bad.write_text(good + "\n\n" + json.dumps({"question": "q", "answer": "two"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:3: the answer does not end in '#### <number>'"):
        load_split(bad)


def test_fractions_and_scientific_notation_are_read_whole_or_refused(tmp_path):
    # A prefix of the number is a wrong gold answer: '#### 3/4' is not 3 and '#### 1e5' is not 1.
    assert gold_answer("x\n#### 3/4") == "3/4" and check_answer("#### 0.75", gold_answer("#### 3/4"))
    assert not check_answer("#### 3", gold_answer("#### 3/4"))
    assert gold_answer("#### 6/8") == "3/4" and gold_answer("#### 4/2") == "2" and gold_answer("#### 1e5") == "100000"
    assert gold_answer("#### 1.5E-3") == "0.0015" and gold_answer("#### $1,234 dollars") == "1234"
    path = tmp_path / "test.jsonl"
    for bad, why in [
        ("3/0", "divides by zero"),
        ("1.2.3", "is not a number kdflow reads"),
        ("2^10", "is not a number"),
        ("3/4/5", "is not a number"),
        ("1e", "is not a number"),
    ]:
        path.write_text(
            json.dumps({"question": "q", "answer": "1+1=2\n#### 2"})
            + "\n"
            + json.dumps({"question": "q", "answer": f"so\n#### {bad}"})
            + "\n"
        )
        with pytest.raises(DataError, match=rf"test.jsonl:2: the gold answer '#### {re.escape(bad)}' {why}"):
            load_split(path)


def test_an_empty_file_is_refused_when_it_is_loaded(tmp_path):
    for text in ("", "\n\n"):
        (tmp_path / "train.jsonl").write_text(text)
        with pytest.raises(DataError, match=rf"{tmp_path / 'train.jsonl'}: no rows; put GSM8K rows in it"):
            load_split(tmp_path / "train.jsonl")


def test_a_lone_surrogate_names_the_line_and_field_before_any_parquet_write(tmp_path):
    from kdflow.config.data import DataSection
    from tasks.data import build_splits

    good = json.dumps({"question": "q", "answer": "1+1=2\n#### 2"})
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(good + "\n")
    # json.dumps escapes the lone surrogate as \ud83d, exactly what a broken export writes
    (tmp_path / "test.jsonl").write_text(good + "\n" + json.dumps({"question": "caf\ud83d", "answer": "#### 2"}) + "\n")
    section = DataSection(source="gsm8k", path=str(tmp_path), splits={"train": 1, "test": 2})
    with pytest.raises(DataError, match=r"test.jsonl:2: field 'question' holds a lone surrogate at character 3"):
        build_splits(section)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.jsonl", "train.jsonl"]


def test_gold_numbers_are_kept_exact_and_absurd_lengths_refused(tmp_path):
    """Issue 23, finding 9: through float, '#### 12345678901234567891' became ...7168 and '#### 1e400' inf."""
    assert gold_answer("#### 12345678901234567891") == "12345678901234567891"
    assert check_answer("#### 12345678901234567891", gold_answer("#### 12345678901234567891"))
    assert not check_answer("#### 12345678901234567168", gold_answer("#### 12345678901234567891"))
    assert gold_answer("#### 0.1") == "0.1" and gold_answer("#### -3.50") == "-3.5" and gold_answer("#### 72.0") == "72"
    assert gold_answer("#### 1e-5") == "0.00001" and gold_answer("#### 1e99") == "1" + "0" * 99
    path = tmp_path / "test.jsonl"
    for bad in ("1e400", "1e100", "1" * 101, "0." + "0" * 100 + "1"):
        path.write_text(json.dumps({"question": "q", "answer": f"so\n#### {bad}"}) + "\n")
        with pytest.raises(
            DataError,
            match=rf"test.jsonl:1: the gold answer '#### {re.escape(bad[:40])}' has more than "
            r"100 digits written out",
        ):
            load_split(path)


def test_an_edited_gsm8k_file_makes_new_splits(tmp_path):
    """The eighth audit: the data stage keyed a GSM8K folder by its path, so an edited gold answer was never read
    (the old split reused, no word). Its files are now part of the key, as instruction files are."""
    import pandas as pd

    from kdflow.config.data import DataSection
    from tasks.data import make_data

    folder = tmp_path / "gsm8k"
    folder.mkdir()
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(1, 5)]
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = DataSection(source="gsm8k", path=str(folder), splits={"train": 4, "test": 4})
    first = make_data.fn(tmp_path / "run", section)
    assert pd.read_parquet(Path(first.path) / "test.parquet")["answer"].tolist() == ["2", "4", "6", "8"]

    edited = [{**rows[0], "answer": "1 + 1 = 3\n#### 3"}, *rows[1:]]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
    second = make_data.fn(tmp_path / "run", section)
    assert second.key != first.key
    assert pd.read_parquet(Path(second.path) / "test.parquet")["answer"].tolist() == ["3", "4", "6", "8"]
    assert make_data.fn(tmp_path / "run", section).key == second.key  # unchanged files: the same output
