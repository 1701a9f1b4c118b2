"""Real data in: JSONL, parquet and saved HF datasets load; malformed input fails naming file and line."""

import json

import pandas as pd
import pytest

from kdflow.store.data_files import DataError, load_rows

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


def test_a_lone_surrogate_names_the_row_and_field(tmp_path):
    from kdflow.store.data_files import check_utf8
    from kdflow.teacher.generation import answer_table

    path = write_jsonl(tmp_path / "rows.jsonl", [ROWS[0], {"question": "ok", "answer": "caf\udce9"}])
    with pytest.raises(DataError, match=r"rows.jsonl:2: field 'answer' holds a lone surrogate at character 3"):
        load_rows(path)
    check_utf8(ROWS, "rows")  # nothing to say
    with pytest.raises(DataError, match=r"rows: row 'r7', field 'tags.1': a lone surrogate at character 0"):
        check_utf8([{"id": "r7", "tags": ["fine", "\ud800x"]}], "rows")

    # A teacher's reply holding one (a JSON "\ud83d" escape on its own): the answers table names the row.
    rows = [
        {
            "id": "r1",
            "split": "prompts",
            "question": "q",
            "answer": "1",
            "sample": 0,
            "prompt": "p",
            "teacher_prompt": "p",
        }
    ]
    reply = {"id": "r1", "sample": 0, "text": "smile \ud83d", "finish_reason": "stop", "completion_tokens": 2}
    with pytest.raises(DataError, match=r"teacher answers: row 'r1', field 'text': a lone surrogate at character 6"):
        answer_table(rows, [reply])
    assert answer_table(rows, [{**reply, "text": "smile \U0001f600"}])["text"][0] == "smile \U0001f600"
