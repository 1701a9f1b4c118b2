"""The small pieces of tasks/ that lean on Prefect itself or are shared between tasks: artifact keys, the one private
Prefect import (reading a result-storage block from sync code), and the distill flow's end-of-run summary."""

from importlib.metadata import version

from prefect.filesystems import LocalFileSystem

from kdflow.reporting.summary import summary_lines
from tasks.artifacts import artifact_key
from tasks.caching import read_path
from tasks.progress import training_key


def test_artifact_keys_are_stable_and_in_prefects_characters():
    assert artifact_key("Demo_run", "report") == "demo-run-report"
    assert artifact_key("demo", "sweep-table") == "demo-sweep-table"
    assert training_key("seq-kd@1") == "training-seq-kd-1"
    assert training_key("@@") == "training-model"


def test_a_result_storage_block_is_read_from_sync_code_on_the_pinned_prefect(tmp_path):
    """tasks/caching.read_path wraps prefect._internal (no public sync reader): this fails first on a Prefect
    upgrade."""
    assert version("prefect") == "3.9.1", "a new Prefect: check tasks/caching.read_path, then update this pin"
    (tmp_path / "record").write_bytes(b'{"a": 1}')
    assert read_path(LocalFileSystem(basepath=str(tmp_path)), "record") == b'{"a": 1}'


def test_the_summary_names_the_report_and_each_models_figures():
    model = {"accuracy": 0.5, "perplexity": 1.25, "params": 1234, "latency_ms_per_token": 0.5}
    report = {
        "teacher": {"api": True, "accuracy": 0.9, "model": "gpt-4o-mini", "weights": "not available"},
        "students": {"seq-kd": model},
    }
    lines = summary_lines(report, "runs/demo/report.md")
    assert lines[0] == "report: runs/demo/report.md"
    assert lines[1].strip().startswith("teacher: ") and "gpt-4o-mini through the API" in lines[1]
    assert lines[2].strip().startswith("seq-kd: ") and "1,234 parameters" in lines[2] and "0.50 ms/token" in lines[2]
