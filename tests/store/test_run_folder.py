"""What a run folder already holds (kdflow/store/run_folder.py): a damaged manifest is not an output, and says so."""

import json
import logging

from kdflow.store import run_folder
from kdflow.store.outputs import MANIFEST, building, finish


def build(run_dir, key: str) -> None:
    with building(run_dir, "stage", key) as tmp:
        (tmp / "data.txt").write_text(key)
        finish(tmp, "stage", key, inputs={"key": key})


def test_a_damaged_manifest_is_skipped_with_a_warning_naming_its_folder(tmp_path, caplog):
    build(tmp_path, "a" * 64)
    build(tmp_path, "b" * 64)
    (tmp_path / "stage" / ("b" * 16) / MANIFEST).write_text('{"stage": "stage", "key": ')  # cut short by hand
    build(tmp_path, "c" * 64)
    (tmp_path / "stage" / ("c" * 16) / MANIFEST).write_text(json.dumps({"stage": "stage"}))  # no key, no sha256
    with caplog.at_level(logging.WARNING, logger="kdflow.store.run_folder"):
        refs = run_folder.outputs(tmp_path, "stage")
    assert [r.key for r in refs] == ["a" * 64]
    warned = [r.getMessage() for r in caplog.records if r.name == "kdflow.store.run_folder"]
    assert len(warned) == 2
    assert any(f"{tmp_path / 'stage' / ('b' * 16)}: damaged {MANIFEST} (JSONDecodeError" in w for w in warned)
    assert any(f"{tmp_path / 'stage' / ('c' * 16)}: damaged {MANIFEST} (KeyError" in w for w in warned)
    assert all("delete the folder to rebuild it" in w for w in warned)
