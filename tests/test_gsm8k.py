"""The GSM8K loader and checker on the real files in ../shared/data/gsm8k."""

import json
import os
from pathlib import Path

import pytest

from data.gsm8k import check_answer, final_answer, load_split

GSM8K = Path(os.environ.get("KDFLOW_GSM8K", Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"))
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(), reason=f"GSM8K not found at {GSM8K} (set KDFLOW_GSM8K)")


@needs_gsm8k
def test_real_gsm8k_gold_solutions_pass_and_changed_answers_fail():
    rows = load_split(GSM8K / "test.jsonl")
    assert len(rows) == 1319
    assert all(check_answer(r["rationale"], r["answer"]) for r in rows)
    changed = [r["rationale"].rsplit("####", 1)[0] + f"#### {int(float(r['answer'])) + 1}" for r in rows]
    assert not any(check_answer(text, r["answer"]) for text, r in zip(changed, rows))
    assert rows[0]["answer"] == "18" and rows[0]["id"] == "test-000000"


def test_equivalent_number_forms():
    assert final_answer("so #### 1,234") == "1234"
    assert final_answer("Answer: $72") == "72"
    assert check_answer("#### 72.0", "72") and check_answer("Answer: 72", "72.00")
    assert final_answer("no final line") is None


def test_malformed_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    good = json.dumps({"question": "q", "answer": "1+1=2\n#### 2"})
    bad.write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"train.jsonl:2: not valid JSON"):
        load_split(bad)
    bad.write_text(good + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl:2: missing field\(s\) \['answer'\]"):
        load_split(bad)
    bad.write_text(json.dumps({"question": "q", "answer": "two"}) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl:1: the answer does not end in '#### <number>'"):
        load_split(bad)
