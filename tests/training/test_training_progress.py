"""Training progress ("Your own teacher, end to end", item 6): one line per logging step at a bounded rate, naming the
stage and the model, with step / total, loss and time left, instead of transformers' bare ``{'loss': ...}`` dicts;
and ``on_progress(step, total, loss, seconds_left)`` for a caller's progress artifact. No assertion on timing."""

import math

import pytest
import torch

from kdflow.config.student import StudentSection
from kdflow.config.templates import chat
from kdflow.config.training import trainer_config
from kdflow.training.progress import TrainingProgress, duration
from kdflow.training.sft import train_sft
from kdflow.training.student import fit_student
from kdflow.training.tiny_models import llama_model
from tests.logit_cache.test_capture import TEMPLATE, kept_rows, tiny_teacher

torch.set_num_threads(1)
TRAINING = {
    "max_steps": 8,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-2,
    "logging_steps": 2,
    "max_length": 64,
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("progress") / "teacher")[1]


def rows():
    return [chat(TEMPLATE.replace("{{ question }}", r["question"]), r["text"]) for r in kept_rows(32)]


def student(tokenizer):
    return llama_model(tokenizer, hidden=32, layers=1, heads=1, intermediate=64, seed=0)


def check_events(events, total):
    steps = [e[0] for e in events]
    assert steps == sorted(set(steps)) and steps[-1] == total and len(steps) == total // TRAINING["logging_steps"]
    assert all(e[1] == total and math.isfinite(e[2]) and e[2] > 0 and e[3] >= 0 for e in events)
    assert events[-1][3] == 0  # nothing left after the last step


def train(tokenizer, out, *callbacks):
    """A fresh student trained on ``rows()`` into ``out``."""
    return train_sft(
        student(tokenizer), tokenizer, rows(), trainer_config(TRAINING, out, 0), out, callbacks=list(callbacks)
    )


def test_progress_events_and_lines_name_the_model_instead_of_bare_loss_dicts(tokenizer, tmp_path, capsys):
    events = []
    progress = TrainingProgress("students", "seq-kd", lambda *e: events.append(e))
    train(tokenizer, tmp_path / "out", progress)
    check_events(events, TRAINING["max_steps"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[students seq-kd] ")]
    assert lines[0].startswith("[students seq-kd] step 2/8  loss ") and lines[0].endswith(" left")
    assert any(line.startswith("[students seq-kd] step 8/8  loss ") for line in lines)  # the last always shows
    assert lines[-1].startswith("[students seq-kd] done: 8/8 steps in ")
    assert "{'loss'" not in out and "'train_runtime'" not in out


def test_a_trainer_given_no_progress_still_prints_no_bare_dicts(tokenizer, tmp_path, capsys):
    train(tokenizer, tmp_path / "out")
    out = capsys.readouterr().out
    assert "[training model] step 2/8" in out and "{'loss'" not in out


def test_the_students_stage_names_its_student_and_reports_through_on_progress(tokenizer, tmp_path, capsys):
    section = StudentSection(
        name="baseline",
        data="gold",
        architecture={"hidden": 32, "layers": 1, "heads": 1, "intermediate": 64},
        training=TRAINING,
    )
    events = []
    fit_student(
        student(tokenizer),
        tokenizer,
        section,
        [{"row_id": str(i), **r} for i, r in enumerate(rows())],
        teacher=None,
        logits=None,
        out=tmp_path / "out",
        checkpoints=tmp_path / "ckpt",
        on_progress=lambda *e: events.append(e),
    )
    check_events(events, TRAINING["max_steps"])
    out = capsys.readouterr().out
    assert "[students baseline] step 8/8  loss " in out and "{'loss'" not in out


def test_the_prefect_artifact_is_keyed_by_student_and_updated_at_a_bounded_rate(monkeypatch):
    import tasks.progress as p

    created, updates = [], []
    monkeypatch.setattr(p, "create_progress_artifact", lambda **kw: created.append(kw) or "artifact-id")
    monkeypatch.setattr(p, "update_progress_artifact", lambda artifact, **kw: updates.append((artifact, kw)))
    assert p.TrainingArtifact("students", "x").artifact is None and created == []  # no Prefect run: no artifact
    monkeypatch.setattr(p.TaskRunContext, "get", classmethod(lambda cls: object()))  # as inside a task run
    on_progress = p.TrainingArtifact("students", "seq-kd@1")
    for step in range(1, 101):  # faster than EVERY_S: only the first and the last step reach the server
        on_progress(step, 100, 0.5, 100 - step)
    assert created == [
        {"progress": 0.0, "key": "training-seq-kd-1", "description": "students seq-kd@1: training steps done"}
    ]
    assert [u[1]["progress"] for u in updates] == [1.0, 100.0] and updates[0][0] == "artifact-id"
    assert updates[-1][1]["description"] == "students seq-kd@1: step 100/100, loss 0.5000, about 0 s left"


def broken_artifact(monkeypatch, update):
    """tasks.progress as inside a task run, with ``update`` as Prefect's update_progress_artifact; the warnings it
    logs are returned as they come."""

    import tasks.progress as p

    warnings = []
    monkeypatch.setattr(p, "create_progress_artifact", lambda **kw: "artifact-id")
    monkeypatch.setattr(p, "update_progress_artifact", update)
    monkeypatch.setattr(p.TaskRunContext, "get", classmethod(lambda cls: object()))
    monkeypatch.setattr(p, "EVERY_S", 0.0)  # every logging step tries the server
    monkeypatch.setattr(p, "get_logger", lambda name: type("L", (), {"warning": lambda self, m: warnings.append(m)})())
    return p.TrainingArtifact("students", "seq-kd"), warnings


def test_a_prefect_server_gone_mid_training_is_logged_once_and_the_training_finishes(tokenizer, tmp_path, monkeypatch):
    import httpx

    tries = []

    def refused(artifact, **kw):  # what update_progress_artifact raised once the server had gone (issue 23, #5)
        tries.append(kw["progress"])
        raise httpx.ConnectError("All connection attempts failed")

    artifact, warnings = broken_artifact(monkeypatch, refused)
    progress = TrainingProgress("students", "seq-kd", artifact)
    train(tokenizer, tmp_path / "out", progress)
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    assert tries == [25.0]  # tried once; not again for every step
    assert warnings == [
        "students seq-kd: progress artifact not updated (ConnectError: All connection attempts "
        "failed); training goes on without it"
    ]


def test_a_prefect_server_that_never_answers_holds_a_step_no_longer_than_the_call_bound(
    tokenizer, tmp_path, monkeypatch
):
    import threading

    import tasks.progress as p

    release = threading.Event()
    artifact, warnings = broken_artifact(monkeypatch, lambda artifact, **kw: release.wait())  # hangs until released
    monkeypatch.setattr(p, "CALL_TIMEOUT_S", 0.2)
    try:
        train(tokenizer, tmp_path / "out", TrainingProgress("students", "seq-kd", artifact))
    finally:
        release.set()
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    assert warnings == [
        "students seq-kd: progress artifact not updated (TimeoutError: no answer from the Prefect API "
        "within 0.2 s); training goes on without it"
    ]


def test_duration():
    assert [duration(s) for s in (0, 42.4, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]


def test_inside_a_prefect_run_the_artifact_follows_the_training(prefect_server):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.progress import TrainingArtifact

    @task
    def train():
        on_progress = TrainingArtifact("students", "seq-kd@2")
        for step in (5, 10):
            on_progress(step, 10, 0.25, 10.0 - step)

    @flow
    def training():
        train()

    training()
    with get_client(sync_client=True) as client:
        key = ArtifactFilterKey(any_=["training-seq-kd-2"])
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=key))
    assert [(a.type, a.data) for a in artifacts][-1] == ("progress", 100.0)
    assert artifacts[-1].description == "students seq-kd@2: step 10/10, loss 0.2500, about 0 s left"
