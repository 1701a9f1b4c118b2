"""``kdflow compare`` on what the fifth audit found: the teacher row says what each run's own report says of its
teacher, and a damaged report.json or an ``--out`` folder is refused naming the path, not as a traceback."""

import pytest

from kdflow.reporting import compare
from tests.reporting.test_report import planted_report, write_run


def teacher_cells(table: str, run: str) -> list[str]:
    return next(line for line in table.splitlines() if line.startswith(f"| {run} | teacher |")).split(" | ")


def test_the_teacher_row_says_what_the_runs_own_report_says_of_its_teacher():
    trained = planted_report("trained")
    given = planted_report("given")
    given["teacher"]["origin"] = "given: /models/qwen-1.5b"
    api = planted_report("api")
    api["teacher"] |= {"api": True, "model": "gpt-x"}
    imported = planted_report("imported")
    imported["teacher"] = {"imported": True, "model": "Qwen/Qwen3-8B", "accuracy": None, "params": None}
    table = compare.render({"trained": trained, "given": given, "api": api, "imported": imported})
    assert teacher_cells(table, "trained")[2] == "gold"
    assert teacher_cells(table, "given")[2] == "given: /models/qwen-1.5b"  # was "gold" for every teacher
    assert teacher_cells(table, "api")[2] == "API model gpt-x"
    cells = teacher_cells(table, "imported")
    assert cells[2] == "Qwen/Qwen3-8B: imported logits only, not evaluated" and cells[3] == "—"


def test_a_cut_short_report_names_the_file_and_says_to_rerun_evaluate(tmp_path, capsys):
    a = write_run(tmp_path / "a", planted_report("a"))
    b = write_run(tmp_path / "b", planted_report("b"))
    text = (b / "report.json").read_text()
    (b / "report.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{b / 'report.json'}: not a readable report .*rerun `kdflow evaluate`"):
        compare.load_report(b)
    with pytest.raises(SystemExit) as exit_:
        compare.main([str(a), str(b)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{b / 'report.json'}: not a readable report" in err and "Traceback" not in err


def test_out_a_folder_is_refused_before_the_table_is_printed(tmp_path, capsys):
    a = write_run(tmp_path / "a", planted_report("a"))
    b = write_run(tmp_path / "b", planted_report("b"))
    with pytest.raises(SystemExit) as exit_:
        compare.main([str(a), str(b), "--out", str(tmp_path)])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing printed, then a traceback: refused up front
    assert (
        f"--out {tmp_path}: a folder, not a file; name the Markdown file to write, e.g. {tmp_path / 'compare.md'}"
        in err
    )
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "compare.md")]) == 0
    assert "| a | teacher | gold |" in (tmp_path / "compare.md").read_text()
