"""What "the same figures" can mean (results log, "Which figures vary"): on one machine, training is deterministic —
the same recipe trains bit-identical weights and the same loss curve twice; across machines CPU kernels may sum in
another order, which is why the docs state a spread instead of promising equal figures."""

import torch

from kdflow.config.templates import chat
from kdflow.config.training import trainer_config
from kdflow.training.sft import train_sft
from kdflow.training.tiny_models import llama_model, train_tokenizer

TRAINING = {
    "max_steps": 12,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-2,
    "logging_steps": 4,
    "max_length": 64,
}


def train_once(folder, tokenizer, rows):
    model = llama_model(tokenizer, hidden=32, layers=1, heads=1, intermediate=64, seed=0)
    history = train_sft(model, tokenizer, rows, trainer_config(TRAINING, folder, 0), folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [h["loss"] for h in history if "loss" in h]


def test_the_same_recipe_trains_the_same_weights_twice_on_one_machine(tmp_path):
    corpus = [f"Solve: {a}+{b}\n{a}+{b}={a + b}\nAnswer: {a + b}" for a in range(10) for b in range(10)]
    tokenizer = train_tokenizer(corpus, 48)
    rows = [chat(f"Solve: {a}+{b}", f"{a}+{b}={a + b}\nAnswer: {a + b}") for a in range(8) for b in range(8)]
    first, losses_1 = train_once(tmp_path / "a", tokenizer, rows)
    second, losses_2 = train_once(tmp_path / "b", tokenizer, rows)
    assert losses_1 and losses_1 == losses_2
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert not all(
        torch.equal(
            first[k], llama_model(tokenizer, hidden=32, layers=1, heads=1, intermediate=64, seed=0).state_dict()[k]
        )
        for k in first
    )  # it did train
