"""Failure and rerun on the miniature recipe, counted: a run that fails in one stage (KDFLOW_FAIL_STAGE, the
documented test hook) and is rerun; a flow process SIGKILLed mid-stage and rerun; two flow processes on the
same recipe at once. Teacher requests are read from the generate stage's manifests, training steps from the
trainers' log histories, both only of outputs made by the rerun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdflow.config.recipe import load_recipe
from kdflow.store import run_folder
from kdflow.store.outputs import FAIL_STAGE_ENV, MANIFEST, InjectedFailure, hash_folder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("data", "teacher", "generate", "curate", "students", "evaluate", "deployment")


def snapshot(run_dir: Path) -> set[str]:
    return {ref.path for stage in STAGES for ref in run_folder.outputs(run_dir, stage)}


def made_since(before: set[str], run_dir: Path, stage: str) -> list:
    return [ref for ref in run_folder.outputs(run_dir, stage) if ref.path not in before]


def training_steps(refs) -> int:
    """Optimizer steps the trainers took for these outputs (the last step of each log history)."""
    return sum(max(e["step"] for e in json.loads((Path(r.path) / "log_history.json").read_text())) for r in refs)


def teacher_requests(refs) -> int:
    return sum(r.manifest()["accounting"]["requests"] for r in refs)


def distill_process(recipe: Path, log: Path) -> subprocess.Popen:
    """`kdflow distill` (``python -m flows.cli distill``) in a process (and session) of its own, on this session's
    Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "distill", str(recipe)],
        cwd=ROOT,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def assert_run_folder_sound(run_dir: Path) -> None:
    """Under real names only finished outputs, each with the content its manifest names, each built from
    outputs that exist (no half-written folder, no output built on another run's lost one)."""
    shas = {stage: {r.sha256 for r in run_folder.outputs(run_dir, stage)} for stage in STAGES}
    for stage in STAGES:
        for folder in (run_dir / stage).iterdir():
            if folder.name.startswith("."):
                continue  # temporary folders: never read
            manifest = json.loads((folder / MANIFEST).read_text())
            assert hash_folder(folder) == manifest["sha256"], folder
            refs = [v for v in manifest["inputs"].values() if isinstance(v, dict) and "ref" in v]
            refs += [
                v
                for d in manifest["inputs"].values()
                if isinstance(d, dict)
                for v in d.values()
                if isinstance(v, dict) and "ref" in v
            ]  # measure_deployment's {name: ref}
            for ref in refs:
                assert ref["sha256"] in shas[ref["ref"]], f"{folder} was built from a {ref['ref']} output that is gone"
    assert json.loads((run_dir / "report.json").read_text())["students"]


def test_failure_in_a_stage_then_rerun_repeats_nothing_before_it_then_stage_flows_alone(
    prefect_server, mini_recipe, monkeypatch
):
    from flows.distill import distill

    run_dir = load_recipe(mini_recipe).run_dir
    monkeypatch.setenv(FAIL_STAGE_ENV, "students")
    with pytest.raises(InjectedFailure):
        distill(str(mini_recipe))
    assert run_folder.outputs(run_dir, "curate") and not run_folder.outputs(run_dir, "students")
    first_requests = teacher_requests(run_folder.outputs(run_dir, "generate"))
    assert first_requests == 80  # train 40 + prompts 40, one sample each

    monkeypatch.delenv(FAIL_STAGE_ENV)
    before = snapshot(run_dir)
    distill(str(mini_recipe))
    for stage in ("data", "teacher", "generate", "curate"):
        assert made_since(before, run_dir, stage) == [], f"{stage} was redone"
    assert teacher_requests(made_since(before, run_dir, "generate")) == 0
    assert training_steps(made_since(before, run_dir, "teacher")) == 0
    # The failed stage and every later one ran: both students (10 steps each), and all three evaluations.
    assert training_steps(made_since(before, run_dir, "students")) == 20
    assert len(made_since(before, run_dir, "evaluate")) == 3
    assert_run_folder_sound(run_dir)

    # Each stage flow alone on the finished run folder: unchanged stages find their outputs ...
    from flows.cli import main as cli
    from flows.curate import curate
    from flows.generate import generate

    before = snapshot(run_dir)
    assert generate(str(mini_recipe)) == run_folder.latest(run_dir, "generate")
    assert curate(str(mini_recipe), str(run_dir)) == run_folder.latest(run_dir, "curate")
    assert snapshot(run_dir) == before
    # ... and "retrain the students of this run with new settings", then evaluate them, from the shell's entry point.
    mini_recipe.write_text(mini_recipe.read_text().replace("learning_rate: 3.0e-3", "learning_rate: 2.0e-3"))
    cli(["students", str(mini_recipe), "--run-dir", str(run_dir)])
    assert training_steps(made_since(before, run_dir, "students")) == 20
    assert training_steps(made_since(before, run_dir, "teacher")) == 0
    assert teacher_requests(made_since(before, run_dir, "generate")) == 0
    cli(["evaluate", str(mini_recipe), "--run-dir", str(run_dir)])
    assert len(made_since(before, run_dir, "evaluate")) == 2  # the two new students; the teacher's is reused
    report = json.loads((run_dir / "report.json").read_text())
    evaluated = {r.manifest()["inputs"]["model"]["sha256"] for r in made_since(before, run_dir, "evaluate")}
    assert evaluated == {r.sha256 for r in made_since(before, run_dir, "students")}
    assert set(report["students"]) == {"baseline", "seq-kd"}
    assert_run_folder_sound(run_dir)


def test_sigkill_mid_stage_then_rerun_completes_without_loss_or_duplicates(prefect_server, mini_recipe, tmp_path):
    from flows.distill import distill

    run_dir = load_recipe(mini_recipe).run_dir
    flow = distill_process(mini_recipe, tmp_path / "killed.log")
    # Kill the whole flow process group while the teacher is training (its temporary folder exists).
    deadline = time.monotonic() + 180
    while not list((run_dir / "teacher").glob(".tmp-*")):
        assert flow.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the teacher stage never started"
        time.sleep(0.05)
    os.killpg(flow.pid, signal.SIGKILL)
    flow.wait()
    assert run_folder.outputs(run_dir, "data") and not run_folder.outputs(run_dir, "teacher")

    before = snapshot(run_dir)
    report = distill(str(mini_recipe))
    assert made_since(before, run_dir, "data") == []  # finished before the kill: kept and reused
    teacher = run_folder.outputs(run_dir, "teacher")
    assert len(teacher) == 1 and training_steps(teacher) == 150  # trained once, in full, by the rerun
    assert not list((run_dir / "teacher").glob(".tmp-*"))  # the killed build's folder removed by the rerun's
    generate = run_folder.outputs(run_dir, "generate")
    assert len(generate) == 1 and teacher_requests(generate) == 80
    import pandas as pd

    answers = pd.read_parquet(Path(generate[0].path) / "answers.parquet")
    assert len(answers) == 80 and not answers.duplicated(["id", "sample"]).any()
    assert len(run_folder.outputs(run_dir, "students")) == 2 and set(report["students"]) == {"baseline", "seq-kd"}
    assert_run_folder_sound(run_dir)


def test_concurrent_runs_of_one_recipe_do_not_corrupt_each_other(prefect_server, mini_recipe, tmp_path):
    """Isolation by atomic rename: each process builds under its own temporary name; the first finished
    copy of a content key is renamed into place, the other process drops its copy and uses that one."""
    run_dir = load_recipe(mini_recipe).run_dir
    flows = [distill_process(mini_recipe, tmp_path / f"run{i}.log") for i in range(2)]
    for i, flow in enumerate(flows):
        assert flow.wait(timeout=400) == 0, (tmp_path / f"run{i}.log").read_text()[-3000:]
    for stage in ("data", "teacher", "generate", "curate"):
        assert len(run_folder.outputs(run_dir, stage)) == 1, stage  # one content key, one output
    assert len(run_folder.outputs(run_dir, "students")) == 2
    assert_run_folder_sound(run_dir)
    # Both processes reported the same models: each used the outputs that were renamed into place.
    summaries = [
        [line for line in (tmp_path / f"run{i}.log").read_text().splitlines() if ": accuracy " in line]
        for i in range(2)
    ]
    assert summaries[0] and summaries[0] == summaries[1]


def test_run_folder_finds_the_newest_finished_output(tmp_path):
    from kdflow.store.outputs import building, finish

    for i, name in enumerate(["baseline", "seq-kd", "baseline"]):
        with building(tmp_path, "students", str(i) * 64) as tmp:
            (tmp / "weights").write_text(str(i))
            finish(tmp, "students", str(i) * 64, inputs={"i": i}, name=name)
    (tmp_path / "students" / "unfinished").mkdir()  # no manifest: never an output
    (tmp_path / "students" / ".tmp-x").mkdir()
    assert len(run_folder.outputs(tmp_path, "students")) == 3
    newest = run_folder.latest(tmp_path, "students", "baseline")
    assert newest.key == "2" * 64 and newest.is_complete()
    assert run_folder.latest(tmp_path, "students").key == "2" * 64
    with pytest.raises(run_folder.MissingStage, match="no finished .curate. output in"):
        run_folder.latest(tmp_path, "curate")
