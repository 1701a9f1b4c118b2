"""Feature KD: the distance on hand examples (identical -> 0, cosine closed form, masking), the layer map, and a
tiny student trained against a wider, deeper live teacher (projection learns, feature loss falls, the saved
student is a plain causal LM, an interrupted run resumes with its trained projection)."""

import math
import random

import pytest
import torch
from torch import nn
from transformers import TrainerCallback

from kdflow.config.templates import chat
from kdflow.config.training import trainer_config
from kdflow.training.feature_kd import (
    FeatureKDConfig,
    FeatureKDTrainer,
    FeatureLossKind,
    check_layer_map,
    default_layer_map,
    feature_loss,
    train_feature_kd,
)
from kdflow.training.tiny_models import llama_model, train_tokenizer

torch.set_num_threads(1)
CORPUS = [f"Solve step by step: {a}+{b}\n{a}+{b}={a + b}\nAnswer: {a + b}" for a in range(10) for b in range(10)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, 48)


def rows(n: int) -> list[dict]:
    rng = random.Random(0)
    pairs = [(rng.randrange(10), rng.randrange(10)) for _ in range(n)]
    return [chat(f"Solve step by step: {a}+{b}", f"{a}+{b}={a + b}\nAnswer: {a + b}") for a, b in pairs]


def teacher_and_student(tokenizer):
    teacher = llama_model(tokenizer, hidden=64, layers=2, heads=2, intermediate=128, seed=1).eval()
    student = llama_model(tokenizer, hidden=32, layers=1, heads=1, intermediate=64, seed=2)
    return teacher, student


TRAINING = dict(
    max_steps=30, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=5, lr_scheduler_type="constant"
)


@pytest.mark.parametrize("kind", list(FeatureLossKind))
def test_identical_hidden_states_give_zero_and_different_ones_a_positive_loss(kind):
    h = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert feature_loss(h, h.clone(), nn.Identity(), mask, kind).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss(h, torch.randn(2, 5, 8), nn.Identity(), mask, kind).item() > 0


def test_mse_and_cosine_on_a_hand_example():
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2)
    teacher = torch.tensor([[[1.0, 1.0], [0.0, -1.0]]])
    mask = torch.tensor([[True, True]])
    cosine = ((1 - 1 / math.sqrt(2)) + (1 - -1)) / 2  # cos 45° at the first position, opposite at the second
    assert feature_loss(student, teacher, nn.Identity(), mask, "cosine").item() == pytest.approx(cosine, rel=1e-6)
    mse = ((0 + 1) / 2 + (0 + 4) / 2) / 2  # mean over the width, then over the positions
    assert feature_loss(student, teacher, nn.Identity(), mask, "mse").item() == pytest.approx(mse, rel=1e-6)


def test_the_projection_maps_student_width_to_teacher_width():
    projection = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        projection.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    student = torch.tensor([[[1.0, 2.0]]])
    teacher = torch.tensor([[[1.0, 2.0, 3.0]]])  # exactly the projected student
    assert feature_loss(student, teacher, projection, torch.tensor([[True]]), "mse").item() == pytest.approx(0.0)


@pytest.mark.parametrize("kind", list(FeatureLossKind))
def test_masked_positions_do_not_contribute(kind):
    student, teacher = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = torch.tensor([[False, False, True, True, True, False], [False, True, True, True, True, True]])
    before = feature_loss(student, teacher, nn.Identity(), mask, kind)
    student2, teacher2 = student.clone(), teacher.clone()
    student2[~mask] = 100 * torch.randn_like(student2[~mask])
    teacher2[~mask] = -7.0
    assert feature_loss(student2, teacher2, nn.Identity(), mask, kind).item() == pytest.approx(before.item(), rel=1e-6)
    # and an all-masked batch is a finite zero, not NaN
    empty = torch.zeros(2, 6, dtype=torch.bool)
    assert feature_loss(student, teacher, nn.Identity(), empty, kind).item() == 0.0


def test_an_unknown_kind_is_refused():
    h, mask = torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="'l1' is not a valid FeatureLossKind"):
        feature_loss(h, h, nn.Identity(), mask, "l1")


def feature_config(training, out, checkpoints=None, **settings):
    return trainer_config(training, out, 0, checkpoints, FeatureKDConfig, **settings)


def test_the_config_refuses_a_negative_weight_and_an_unknown_loss(tmp_path):
    with pytest.raises(ValueError, match=r"FeatureKDConfig.feature_weight = -1.0: Input should be greater than 0"):
        feature_config(TRAINING, tmp_path, feature_weight=-1.0)
    with pytest.raises(ValueError, match="'l1' is not a valid FeatureLossKind"):
        feature_config(TRAINING, tmp_path, feature_loss="l1")


def test_default_layer_map_is_uniform_and_maps_last_to_last():
    assert default_layer_map(1, 2) == [(1, 2)]
    assert default_layer_map(2, 4) == [(1, 2), (2, 4)]
    assert default_layer_map(3, 4) == [(1, 1), (2, 3), (3, 4)]
    assert default_layer_map(4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    with pytest.raises(ValueError, match=r"layer pair \(2, 1\) is out of range: student layers are 0..1"):
        check_layer_map([(2, 1)], student_layers=1, teacher_layers=2)


def test_training_learns_the_projection_and_lowers_the_feature_loss(tokenizer, tmp_path):
    from datasets import Dataset

    teacher, student = teacher_and_student(tokenizer)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    config = feature_config(TRAINING, tmp_path, feature_layers=default_layer_map(1, 2))
    trainer = FeatureKDTrainer(
        student,
        teacher,
        args=config,
        train_dataset=Dataset.from_list(rows(64)),
        processing_class=tokenizer,
    )
    projection = trainer.projections["s1_t2"]
    assert isinstance(projection, nn.Linear) and projection.weight.shape == (64, 32)
    initial = projection.weight.detach().clone()
    trainer.train()
    logged = [e for e in trainer.state.log_history if "feature_loss" in e]
    assert len(logged) == 6 and all("ce_loss" in e and math.isfinite(e["ce_loss"]) for e in logged)
    assert logged[-1]["feature_loss"] < 0.7 * logged[0]["feature_loss"]
    assert not torch.allclose(projection.weight, initial)  # the optimizer saw the projection
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())  # the teacher is frozen
    assert not hasattr(student, "feature_projections")  # detached once training returns


def test_train_feature_kd_saves_a_plain_causal_lm(tokenizer, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    teacher, student = teacher_and_student(tokenizer)
    config = feature_config(
        dict(TRAINING, max_steps=4, logging_steps=2), tmp_path, feature_loss="cosine", feature_weight=0.5
    )
    history = train_feature_kd(student, teacher, tokenizer, rows(16), config, tmp_path)
    assert [e["feature_loss"] for e in history if "feature_loss" in e]
    assert json.loads((tmp_path / "log_history.json").read_text()) == history
    assert not hasattr(student, "feature_projections")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert not any("projection" in k for k in reloaded.state_dict())
    assert set(reloaded.state_dict()) == set(student.state_dict())


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {self.step}")


class FirstProjection(TrainerCallback):
    """The projection weight the (resumed) run starts its first step with."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if not hasattr(self, "weight"):
            self.weight = model.feature_projections["s1_t2"].weight.detach().clone()


def test_a_resumed_run_continues_with_the_checkpointed_projections(tokenizer, tmp_path):
    from safetensors.torch import load_file

    training = dict(TRAINING, max_steps=10, save_steps=5, logging_steps=1)
    checkpoints = tmp_path / "checkpoints"
    teacher, student = teacher_and_student(tokenizer)
    with pytest.raises(KeyboardInterrupt):
        config = feature_config(training, tmp_path / "a", checkpoints)
        train_feature_kd(student, teacher, tokenizer, rows(16), config, tmp_path / "a", callbacks=[StopAt(7)])
    saved = load_file(checkpoints / "checkpoint-5" / "model.safetensors")["feature_projections.s1_t2.weight"]
    first = FirstProjection()
    teacher, student = teacher_and_student(tokenizer)
    config = feature_config(training, tmp_path / "b", checkpoints)
    history = train_feature_kd(student, teacher, tokenizer, rows(16), config, tmp_path / "b", callbacks=[first])
    assert history[0] == {"resumed_from": "checkpoint-5"}
    assert [e["step"] for e in history if "feature_loss" in e] == list(range(1, 11))
    assert torch.equal(first.weight, saved)  # not a fresh projection: the one trained for 5 steps
    assert checkpoints.exists()  # training leaves them; the students stage removes them once its output is in place
