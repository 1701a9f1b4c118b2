"""Whole checkpoints only (issue 23, finding 2): a save cut short (a kill, a full disk) leaves ``checkpoint-N`` without
its ``trainer_state.json`` (transformers 5 writes it last, in place); a rerun sets it aside as ``torn-checkpoint-N``
with a warning and resumes from the newest whole one instead of failing on every rerun. A save that fails for want
of space says "disk full", the folder and the fix."""

import errno
import json
import logging

import pytest
import torch
from transformers import Trainer
from transformers.trainer_callback import TrainerState

import kdflow.training.checkpoints as checkpoints_module
from kdflow.config.training import trainer_config
from kdflow.training.checkpoints import DiskFull, disk_full, last_checkpoint, whole
from kdflow.training.sft import train_sft
from tests.training.test_finite_training import sft_rows, student, teacher  # noqa: F401  (teacher: the fixture)

torch.set_num_threads(1)
TRAINING = {
    "max_steps": 6,
    "save_steps": 2,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "max_length": 64,
}
# What torch.save raised on a full tmpfs (measured): the errno is lost on the way.
TORCH_ENOSPC = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


class Killed(BaseException):
    """A SIGKILL mid-save, as far as the process can tell: nothing after it runs."""


def test_a_checkpoint_killed_before_its_state_was_written_is_set_aside_and_the_rerun_resumes(
    teacher,
    tmp_path,  # noqa: F811
    monkeypatch,
    caplog,
):
    _, tok = teacher
    folder, save = tmp_path / "checkpoints", TrainerState.save_to_json

    def killed_at_step_4(self, path):
        if self.global_step == 4:
            raise Killed("SIGKILL while checkpoint-4 was being written")
        return save(self, path)

    monkeypatch.setattr(TrainerState, "save_to_json", killed_at_step_4)
    with pytest.raises(Killed):
        train_sft(student(tok), tok, sft_rows(), trainer_config(TRAINING, tmp_path / "a", 0, folder), tmp_path / "a")
    monkeypatch.setattr(TrainerState, "save_to_json", save)
    torn = folder / "checkpoint-4"
    assert (torn / "model.safetensors").is_file() and not (torn / "trainer_state.json").exists()
    assert whole(folder / "checkpoint-2") and not whole(torn)

    with caplog.at_level(logging.WARNING, logger="kdflow.training.checkpoints"):
        assert last_checkpoint(folder, set_aside=False) == str(folder / "checkpoint-2")  # another rank: only reads
        assert torn.is_dir()
        history = train_sft(
            student(tok), tok, sft_rows(), trainer_config(TRAINING, tmp_path / "b", 0, folder), tmp_path / "b"
        )
    assert history[0] == {"resumed_from": "checkpoint-2"} and history[-1]["step"] == 6
    assert "checkpoint-4: a torn checkpoint" in caplog.text and "set aside as torn-checkpoint-4" in caplog.text
    assert (tmp_path / "b" / "model" / "model.safetensors").is_file()
    assert whole(folder / "checkpoint-6")  # kept until the stage's output is complete: its owner removes it


def test_a_state_file_cut_short_is_torn_and_a_second_torn_one_gets_its_own_name(tmp_path):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hi')  # disk full mid-write
    (tmp_path / "torn-checkpoint-4").mkdir()  # set aside by an earlier rerun
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert (tmp_path / "torn-checkpoint-4.2").is_dir() and not (tmp_path / "checkpoint-4").exists()
    assert last_checkpoint(tmp_path / "nothing-here") is None


def test_a_full_disk_mid_checkpoint_says_disk_full_and_the_rerun_resumes_from_the_whole_one(
    teacher,
    tmp_path,  # noqa: F811
    monkeypatch,
):
    _, tok = teacher
    folder, save = tmp_path / "checkpoints", Trainer._save_optimizer_and_scheduler

    def disk_fills_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise RuntimeError(TORCH_ENOSPC)  # the weights are written; the optimizer's state does not fit
        return save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", disk_fills_at_step_4)
    monkeypatch.setattr(checkpoints_module, "free_bytes", lambda folder: 0)
    with pytest.raises(
        DiskFull,
        match=rf"disk full while saving to {folder} \(0 MiB free on its disk; RuntimeError: "
        r"\[enforce fail.*\)\. Free space on that disk, or put the run folder \(run.root\) "
        "on a larger one, then rerun",
    ) as failed:
        train_sft(student(tok), tok, sft_rows(), trainer_config(TRAINING, tmp_path / "a", 0, folder), tmp_path / "a")
    assert failed.value.errno == errno.ENOSPC
    monkeypatch.undo()  # space freed
    history = train_sft(
        student(tok), tok, sft_rows(), trainer_config(TRAINING, tmp_path / "b", 0, folder), tmp_path / "b"
    )
    assert history[0] == {"resumed_from": "checkpoint-2"} and history[-1]["step"] == 6


def test_what_counts_as_a_full_disk(tmp_path, monkeypatch):
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path) is not None
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path) is not None
    # safetensors' error (measured on a full tmpfs), and one raised while handling it
    safetensors = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    try:
        try:
            raise safetensors
        except Exception:
            raise RuntimeError("saving the model failed")
    except RuntimeError as e:
        assert "disk full while saving to" in str(disk_full(e, tmp_path))
    # torch's errno-less write error is a full disk only where the disk is (nearly) full
    monkeypatch.setattr(checkpoints_module, "free_bytes", lambda folder: 10 * 2**30)
    assert disk_full(RuntimeError(TORCH_ENOSPC), tmp_path) is None
    monkeypatch.setattr(checkpoints_module, "free_bytes", lambda folder: 2**20)
    assert disk_full(RuntimeError(TORCH_ENOSPC), tmp_path) is not None
    assert disk_full(ValueError("something else"), tmp_path) is None
    assert disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
