"""Online KD through TRL's GKD trainer: a tiny student learns from a live tiny teacher (same tokenizer) off-policy
(λ = 0) and partly on-policy (λ = 0.5); the loss is finite and logged, the student's samples are used only when
λ > 0, and the saved student reloads."""

import json
import math
import random

import pytest
import torch

from kdflow.config.templates import chat
from kdflow.config.training import trainer_config
from kdflow.training.online_kd import GKDConfig, messages_row, train_online
from kdflow.training.tiny_models import llama_model, train_tokenizer

torch.set_num_threads(1)
CORPUS = [f"Solve step by step: {a}+{b}\n{a}+{b}={a + b}\nAnswer: {a + b}" for a in range(10) for b in range(10)]
TRAINING = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=2)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, 48)


def rows(n: int) -> list[dict]:
    rng = random.Random(0)
    pairs = [(rng.randrange(10), rng.randrange(10)) for _ in range(n)]
    return [chat(f"Solve step by step: {a}+{b}", f"{a}+{b}={a + b}\nAnswer: {a + b}") for a, b in pairs]


def test_a_row_becomes_one_conversation():
    row = chat("q", "a")
    assert messages_row(row) == {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def test_an_out_of_range_lambda_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="lmbda must be in the range"):
        trainer_config(TRAINING, tmp_path, 0, None, GKDConfig, lmbda=1.5, beta=0.5, temperature=1.0, max_new_tokens=4)


@pytest.mark.parametrize("lmbda", [0.0, 0.5])
def test_gkd_trains_a_tiny_student_from_a_live_teacher(tokenizer, tmp_path, monkeypatch, lmbda):
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDTrainer

    samples = []
    generate = GKDTrainer.generate_on_policy_outputs
    monkeypatch.setattr(
        GKDTrainer, "generate_on_policy_outputs", staticmethod(lambda *a: samples.append(1) or generate(*a))
    )
    teacher = llama_model(tokenizer, hidden=64, layers=2, heads=2, intermediate=128, seed=1)
    student = llama_model(tokenizer, hidden=32, layers=1, heads=1, intermediate=64, seed=2)
    config = trainer_config(
        TRAINING, tmp_path, 0, None, GKDConfig, lmbda=lmbda, beta=0.5, temperature=1.0, max_new_tokens=8
    )
    history = train_online(student, teacher, tokenizer, rows(24), config, tmp_path)
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    assert json.loads((tmp_path / "log_history.json").read_text()) == history
    assert (len(samples) > 0) == (lmbda > 0)  # the student's own samples are trained on only when λ > 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, student.state_dict()[name])
