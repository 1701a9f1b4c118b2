"""A rerun after a failure does not lose finished training. The students stage trains into its work folder and links
the sealed result into its output (kdflow/training/trained.py); the work folder, checkpoints and all, goes only once
the output is in place. A fault after the last step (while the manifest's figures are read, or while the final model
is saved) reruns with no training step; one in the middle resumes from the newest checkpoint; a damaged sealed result
is not reused. Steps are counted by wrapping ``Trainer.training_step``: no timing."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import Trainer

import kdflow.training.sft as sft
import tasks.students as students
from kdflow.config.student import StudentSection
from kdflow.store.model_folders import write_location
from kdflow.store.outputs import file_sha256
from kdflow.training.checkpoints import whole
from kdflow.training.curves import read_curve
from kdflow.training.trained import PART, SEAL, TRAINED, fresh, link_tree, seal, sealed
from tests.logit_cache.test_capture import TEMPLATE, kept_rows, stage_ref
from tests.training.test_finite_training import TRAINING, teacher  # noqa: F401  (teacher: the fixture)

torch.set_num_threads(1)
ARCHITECTURE = {"hidden": 32, "layers": 1, "heads": 1, "intermediate": 64}


@pytest.fixture
def stage(teacher, tmp_path, monkeypatch):  # noqa: F811
    """The students stage's inputs, a way to run it, and the step each training step started from, per attempt."""
    folder, _ = teacher
    run_dir = tmp_path / "run"
    inputs = dict(
        teacher=stage_ref(run_dir, "teacher", lambda d: write_location(d, str(folder))),
        data=stage_ref(run_dir, "data", lambda d: None),
        curated=stage_ref(run_dir, "curate", lambda d: pd.DataFrame(kept_rows(16)).to_parquet(d / "kept.parquet")),
    )
    steps, step = [], Trainer.training_step

    def counted(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", counted)

    def run(section):
        steps.clear()
        return students.train_student.fn(run_dir, section, TEMPLATE, **inputs)

    def work(section):
        return students.STUDENTS.output(run_dir, section=section, template=TEMPLATE, **inputs).work

    return run, work, steps


def test_a_failure_after_training_reruns_without_training_and_keeps_the_trained_weights(stage, monkeypatch):
    run, work, steps = stage
    section = StudentSection(name="seq-kd", data="teacher", training=TRAINING, architecture=ARCHITECTURE)

    def broken(*args, **kwargs):
        raise ImportError("cannot import name 'summary' (a module that runs after training)")

    with monkeypatch.context() as m:
        m.setattr(students, "topk_summary", broken)
        with pytest.raises(ImportError):
            run(section)
    assert steps == [0, 1, 2, 3, 4, 5]
    kept = work(section) / TRAINED
    assert sealed(work(section)) is not None and whole(work(section) / "checkpoint-6")
    weights = file_sha256(kept / "model" / "model.safetensors")

    ref = run(section)
    assert steps == []  # not one training step on the rerun
    assert file_sha256(ref.path + "/model/model.safetensors") == weights  # the weights the first attempt trained
    history = json.loads((Path(ref.path) / "log_history.json").read_text())
    assert "resumed_from" not in history[0] and max(h.get("step", 0) for h in history) == 6
    assert ref.manifest()["seconds"] > 0 and ref.is_complete()
    assert not work(section).exists()  # removed once the output is in place


def test_a_failure_saving_the_final_model_resumes_at_the_last_step_with_its_whole_curve(stage, monkeypatch):
    run, work, steps = stage
    section = StudentSection(name="curve", data="teacher", training=TRAINING, architecture=ARCHITECTURE, curve_points=3)

    def disk_error(*args, **kwargs):
        raise OSError("I/O error while saving the final model")

    with monkeypatch.context() as m:
        m.setattr(sft, "save_model", disk_error)
        with pytest.raises(OSError, match="I/O error"):
            run(section)
    assert steps == [0, 1, 2, 3, 4, 5] and sealed(work(section)) is None  # nothing half-written is sealed

    ref = run(section)
    assert steps == []
    history = json.loads((Path(ref.path) / "log_history.json").read_text())
    assert history[0] == {"resumed_from": "checkpoint-6"}
    curve = read_curve(ref.path)
    assert [p["step"] for p in curve["points"]] == [2, 4, 6] and curve["resumed_at"] == 6
    assert all(p["seconds"] > 0 for p in curve["points"])
    assert (Path(ref.path) / "curve" / "step-2" / "model.safetensors").is_file() and ref.is_complete()


def test_a_failure_mid_training_resumes_from_the_newest_checkpoint(stage, monkeypatch):
    run, work, steps = stage
    section = StudentSection(name="killed", data="teacher", training=TRAINING, architecture=ARCHITECTURE)
    counted = Trainer.training_step

    def killed_at_step_5(self, *args, **kwargs):
        if self.state.global_step == 4:  # checkpoint-4 is saved; the fifth step never finishes
            raise KeyboardInterrupt("killed")
        return counted(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "training_step", killed_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            run(section)
    assert whole(work(section) / "checkpoint-4") and sealed(work(section)) is None

    run(section)
    assert steps == [4, 5]


def test_a_sealed_result_that_no_longer_matches_its_seal_is_not_reused(tmp_path, caplog):
    part = fresh(tmp_path)
    (part / "model").mkdir()
    (part / "model" / "model.safetensors").write_bytes(b"x" * 100)
    assert sealed(tmp_path) is None  # not sealed yet: an attempt cut short
    record = seal(tmp_path, seconds=1.5)
    assert record["files"] == {"model/model.safetensors": 100} and not (tmp_path / PART).exists()
    assert sealed(tmp_path) == record

    out = tmp_path / "out"
    link_tree(tmp_path / TRAINED, out)
    assert (out / "model" / "model.safetensors").read_bytes() == b"x" * 100 and not (out / SEAL).exists()

    (tmp_path / TRAINED / "model" / "model.safetensors").write_bytes(b"x" * 10)  # truncated
    assert sealed(tmp_path) is None and not (tmp_path / TRAINED).exists()
    assert "does not match its seal" in caplog.text
