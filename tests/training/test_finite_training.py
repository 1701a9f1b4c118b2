"""Finite training or a clear failure (issue 23, finding 1): recipes refuse non-finite numbers and out-of-range KD
temperatures at load, naming the field and its line; training checks the loss, the gradient and the weights every
step and fails naming the step, before the update and before anything is saved, so that no manifest marks a NaN
model complete."""

import math

import pytest
import torch

from kdflow.config.loading import RecipeError
from kdflow.config.recipe import parse_recipe
from tests.config.test_recipe import DEMO, line_of

torch.set_num_threads(1)


def error_of(text: str) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "demo.yaml")
    return str(e.value)


# ---- at load ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN", ".Inf"])
def test_a_non_finite_learning_rate_is_refused_at_its_line(value):
    text = DEMO.replace("      learning_rate: 3.0e-3", f"      learning_rate: {value}")
    msg = error_of(text)
    assert f"demo.yaml:{line_of(text, f'learning_rate: {value}')}: students.0.training.learning_rate: " in msg
    assert "is not a finite number: write a number" in msg


def test_a_non_finite_number_nested_in_the_free_training_dict_is_refused_where_it_is_written():
    teacher = "    warmup_steps: 50\n"
    text = DEMO.replace(teacher, teacher + "    lr_scheduler_kwargs: {min_lr: .nan}\n", 1)
    msg = error_of(text)
    assert (
        f"demo.yaml:{line_of(text, 'min_lr: .nan')}: teacher.training.lr_scheduler_kwargs.min_lr: nan is not a "
        "finite number" in msg
    )


def test_typed_numbers_of_every_section_refuse_inf_and_nan():
    kd = "kd: {method: offline, divergence: forward_kl, alpha: 0.5, temperature: 1.0}"
    text = DEMO.replace(kd, kd.replace("temperature: 1.0", "temperature: .inf"))
    assert (
        f"demo.yaml:{line_of(text, 'temperature: .inf')}: students.2.kd.temperature: inf is not a finite"
        in error_of(text)
    )
    text = DEMO.replace(kd, kd.replace("alpha: 0.5", "alpha: .nan"))
    assert "students.2.kd.alpha: nan is not a finite number" in error_of(text)


@pytest.mark.parametrize("temperature", ["0.001", "1.0e+6", "1.0e+300"])
def test_kd_temperatures_outside_their_range_are_refused_with_the_range(temperature):
    kd = "kd: {method: offline, divergence: forward_kl, alpha: 0.5, temperature: 1.0}"
    msg = error_of(DEMO.replace(kd, kd.replace("temperature: 1.0", f"temperature: {temperature}")))
    assert "students.2.kd.temperature: " in msg and "a softmax temperature must be in [0.01, 50.0]" in msg
    on_policy = "kd: {method: on_policy, divergence: reverse_kl, temperature: 1.0"
    text = DEMO.replace(kd, on_policy.replace("temperature: 1.0", f"temperature: {temperature}") + "}")
    assert "a softmax temperature must be in [0.01, 50.0]" in error_of(text)


def test_the_shipped_temperatures_and_learning_rates_still_load():
    assert parse_recipe(DEMO.replace("temperature: 1.0}", "temperature: 20.0}", 1), "demo.yaml")
    assert math.isfinite(parse_recipe(DEMO, "demo.yaml").students[0].training["learning_rate"])


# ---- while training --------------------------------------------------------------------------------------------

TRAINING = {
    "max_steps": 6,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "max_length": 64,
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tests.logit_cache.test_capture import tiny_teacher

    folder = tmp_path_factory.mktemp("finite") / "teacher"
    return folder, tiny_teacher(folder, sharpen=20.0)[1]


def student(tokenizer):
    from kdflow.training.tiny_models import llama_model

    return llama_model(tokenizer, hidden=32, layers=1, heads=1, intermediate=64, seed=0)


def sft_rows():
    from kdflow.config.templates import chat
    from tests.logit_cache.test_capture import TEMPLATE, kept_rows

    return [chat(TEMPLATE.replace("{{ question }}", r["question"]), r["text"]) for r in kept_rows(32)]


def test_a_learning_rate_that_overflows_the_weights_fails_at_that_step_and_saves_nothing(teacher, tmp_path):
    from kdflow.config.training import trainer_config
    from kdflow.training.finite import NonFiniteTraining
    from kdflow.training.progress import TrainingProgress
    from kdflow.training.sft import train_sft

    _, tok = teacher
    with pytest.raises(
        NonFiniteTraining,
        match=r"^\[students huge-lr\] the update made weights (NaN|infinite) at step "
        r"1 of 6; training stopped .*training.learning_rate is 1e\+300 here",
    ):
        train_sft(
            student(tok),
            tok,
            sft_rows(),
            trainer_config(
                {**TRAINING, "learning_rate": 1e300, "save_steps": 1}, tmp_path / "out", 0, tmp_path / "checkpoints"
            ),
            tmp_path / "out",
            callbacks=[TrainingProgress("students", "huge-lr")],
        )
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "log_history.json").exists()
    assert not list((tmp_path / "checkpoints").glob("checkpoint-*"))  # the step that overflowed was never saved


def test_a_nan_teacher_fails_the_step_it_reaches_naming_it_and_earlier_checkpoints_stay_finite(
    teacher, tmp_path, monkeypatch
):
    """A NaN in the teacher's cached log-probs of step 3's batch: the loss is NaN (not a finite loss hiding a
    NaN gradient), training stops at step 3 before its update; checkpoint-2 is finite and a rerun resumes from it."""
    import pandas as pd
    from safetensors.torch import load_file

    from kdflow.config.logit_cache import LogitCacheSection
    from kdflow.config.training import trainer_config
    from kdflow.store.model_folders import write_location
    from kdflow.training.finite import NonFiniteTraining
    from kdflow.training.offline_kd import CachedLogitsCollator, OfflineKDConfig, train_offline_kd
    from tasks.capture import capture_logits
    from tests.logit_cache.test_capture import TEMPLATE, kept_rows, stage_ref

    folder, tok = teacher
    run_dir = tmp_path / "run"
    teacher_ref = stage_ref(run_dir, "teacher", lambda d: write_location(d, str(folder)))
    curated = stage_ref(run_dir, "curate", lambda d: pd.DataFrame(kept_rows(32)).to_parquet(d / "kept.parquet"))
    cache = capture_logits.fn(run_dir, LogitCacheSection(k=5, shard_rows=16), TEMPLATE, teacher_ref, curated).path
    calls, collate = [], CachedLogitsCollator.__call__

    def poisoned(self, examples):
        batch = collate(self, examples)
        calls.append(len(examples))
        if len(calls) == 3:  # the third batch is step 3's (the loader keeps the order, whatever it prefetches)
            b, t = batch["teacher_mask"].nonzero()[0].tolist()
            batch["teacher_logprobs"][b, t, 0] = float("nan")
        return batch

    monkeypatch.setattr(CachedLogitsCollator, "__call__", poisoned)
    training, checkpoints = {**TRAINING, "save_steps": 2}, tmp_path / "checkpoints"
    with pytest.raises(
        NonFiniteTraining,
        match=r"the loss became NaN at step 3 of 6; training stopped before that "
        r"step's update",
    ):
        train_offline_kd(
            student(tok),
            tok,
            None,
            trainer_config(
                training, tmp_path / "a", 0, checkpoints, OfflineKDConfig, logit_cache=str(cache), alpha=0.5
            ),
            tmp_path / "a",
        )
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    weights = load_file(checkpoints / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "a" / "model").exists()
    monkeypatch.setattr(CachedLogitsCollator, "__call__", collate)  # the teacher is healthy again
    history = train_offline_kd(
        student(tok),
        tok,
        None,
        trainer_config(training, tmp_path / "b", 0, checkpoints, OfflineKDConfig, logit_cache=str(cache), alpha=0.5),
        tmp_path / "b",
    )
    assert history[0] == {"resumed_from": "checkpoint-2"}
    assert all(math.isfinite(h["loss"]) for h in history if "loss" in h)


def test_the_students_stage_writes_no_manifest_for_a_model_that_did_not_stay_finite(teacher, tmp_path):
    import pandas as pd

    from kdflow.config.student import StudentSection
    from kdflow.store.model_folders import write_location
    from kdflow.training.finite import NonFiniteTraining
    from tasks.students import STUDENTS, train_student
    from tests.logit_cache.test_capture import TEMPLATE, kept_rows, stage_ref

    folder, _ = teacher
    run_dir = tmp_path / "run"
    teacher_ref = stage_ref(run_dir, "teacher", lambda d: write_location(d, str(folder)))
    data = stage_ref(run_dir, "data", lambda d: None)
    curated = stage_ref(run_dir, "curate", lambda d: pd.DataFrame(kept_rows(16)).to_parquet(d / "kept.parquet"))
    section = StudentSection(
        name="huge-lr",
        data="teacher",
        training={**TRAINING, "learning_rate": 1e300},
        architecture={"hidden": 32, "layers": 1, "heads": 1, "intermediate": 64},
    )
    with pytest.raises(NonFiniteTraining, match=r"^\[students huge-lr\] the update made weights .* at step 1 of 6"):
        train_student.fn(run_dir, section, TEMPLATE, teacher_ref, data, curated)
    out = STUDENTS.output(
        run_dir, section=section, template=TEMPLATE, teacher=teacher_ref, data=data, curated=curated, logits=None
    )
    assert out.done is None  # not complete: a rerun trains it again rather than reusing and evaluating NaN weights


def test_under_fp16_loss_scaling_an_overflowing_gradient_is_left_to_the_scaler():
    """The scaler skips such a step and lowers its scale (weights unchanged); everywhere else it is an error."""
    from types import SimpleNamespace

    from kdflow.training.finite import FiniteSteps, NonFiniteTraining

    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.full((2, 2), float("inf"))
    state, args = SimpleNamespace(global_step=4, max_steps=10), SimpleNamespace(learning_rate=1e-3)
    FiniteSteps(grads=False).on_pre_optimizer_step(args, state, None, model=model)
    with pytest.raises(NonFiniteTraining, match=r"^the gradient became infinite at step 5 of 10"):
        FiniteSteps().on_pre_optimizer_step(args, state, None, model=model)
