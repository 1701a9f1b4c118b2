"""Real data in: JSONL, parquet and saved HF datasets load; malformed input fails naming file and line."""

import json

import pandas as pd
import pytest

from kdflow.loaders import DataError, load_rows

ROWS = [{"question": "What is 2+2?", "answer": "4"}, {"question": "Name a colour.", "answer": "red"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_three_formats_give_the_same_rows(tmp_path):
    from datasets import Dataset

    jsonl = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    parquet = tmp_path / "rows.parquet"
    pd.DataFrame(ROWS).to_parquet(parquet, index=False)
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    for source in (jsonl, parquet, tmp_path / "hf"):
        assert load_rows(source, required=("question", "answer"), prompt_field="question") == ROWS, source
    assert load_rows(jsonl, n=1) == ROWS[:1]


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + '{"question": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not UTF-8"):
        load_rows(path)
    write_jsonl(path, [ROWS[0], {"answer": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field\(s\) \['question'\]"):
        load_rows(path, required=("question",))
    write_jsonl(path, [ROWS[0], ROWS[1], {"question": "  ", "answer": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl:3: empty prompt in field 'question'"):
        load_rows(path, prompt_field="question")
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object"):
        load_rows(path)


def test_malformed_parquet_names_the_row_and_unknown_formats_say_what_is_read(tmp_path):
    parquet = tmp_path / "rows.parquet"
    pd.DataFrame([ROWS[0], {"question": "", "answer": "x"}]).to_parquet(parquet, index=False)
    with pytest.raises(DataError, match=r"rows.parquet: row 2: empty prompt"):
        load_rows(parquet, prompt_field="question")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"broken.parquet: not a readable parquet file"):
        load_rows(tmp_path / "broken.parquet")
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"rows.csv: .*\.jsonl, \.parquet"):
        load_rows(tmp_path / "rows.csv")
