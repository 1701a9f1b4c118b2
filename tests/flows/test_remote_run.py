"""The distill flow on the miniature recipe with its run folder on an fsspec URL (file://, as an object store would
be used): every stage output is uploaded whole, manifest last; a second run from an empty staging folder — another
machine — takes every stage's output from the remote and builds none again (real Prefect)."""

import json
import shutil
from pathlib import Path

import pytest

from kdflow.config.recipe import load_recipe
from tests.conftest import assert_rerun_report

pytestmark = pytest.mark.slow

STAGES = ("data", "teacher", "generate", "curate", "students", "evaluate", "deployment")


def outputs_under(run: Path, stage: str) -> dict[str, bytes]:
    """Output folder name -> its manifest's bytes (finished outputs only; lock and work files left out)."""
    return {p.parent.name: p.read_bytes() for p in sorted((run / stage).glob("[!.]*/manifest.json"))}


def test_distill_with_a_remote_run_folder_then_reused_from_an_empty_staging_folder(
    prefect_server, mini_recipe, tmp_path
):
    from flows.distill import distill

    remote_root, staging = tmp_path / "bucket" / "runs", tmp_path / "staging"
    text = mini_recipe.read_text().replace(
        f"root: {tmp_path / 'runs'}", f"root: file://{remote_root}\n  staging: {staging}"
    )
    mini_recipe.write_text(text)
    r = load_recipe(mini_recipe)
    assert r.run_dir == staging / "mini"
    remote_run = remote_root / "mini"

    report = distill(str(mini_recipe))
    for stage in STAGES:
        there, here = outputs_under(remote_run, stage), outputs_under(r.run_dir, stage)
        assert there and there == here, stage  # every finished output uploaded, the same manifest
        for name in there:
            files = [p for p in (remote_run / stage / name).rglob("*") if p.is_file()]
            manifest = remote_run / stage / name / "manifest.json"
            assert max(p.stat().st_mtime_ns for p in files) == manifest.stat().st_mtime_ns, f"{stage}: manifest last"
            local = {p.relative_to(r.run_dir).as_posix() for p in (r.run_dir / stage / name).rglob("*") if p.is_file()}
            assert {p.relative_to(remote_run).as_posix() for p in files} == local
    assert json.loads((remote_run / "report.json").read_text()) == report
    assert not [p for p in remote_run.rglob(".*")]  # no lock, work, temporary or binding files uploaded

    # Another machine: an empty staging folder. Every stage finds its output remotely; none is built again
    # (a rebuilt output would have a new manifest, written at its own time) and nothing is uploaded again.
    uploaded = {p: p.stat().st_mtime_ns for p in remote_run.rglob("manifest.json")}
    shutil.rmtree(staging)
    assert_rerun_report(distill(str(mini_recipe)), report)
    for stage in STAGES:
        assert outputs_under(r.run_dir, stage) == outputs_under(remote_run, stage), stage
    assert {p: p.stat().st_mtime_ns for p in remote_run.rglob("manifest.json")} == uploaded
