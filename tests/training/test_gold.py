"""Cross-tokenizer KD through TRL's GOLD (kdflow/training/gold.py): a tiny student learns from a tiny teacher
with a different tokenizer, off-policy (λ = 0) and on its own samples (λ = 1), and the saved student reloads."""

import json
import math
import random

import pytest
import torch

from kdflow.config.templates import chat
from kdflow.config.training import trainer_config
from kdflow.training.gold import GOLDConfig, train_gold
from kdflow.training.tiny_models import llama_model
from tests.training.test_tokenizer_compat import large, small  # noqa: F401  (fixtures: two tokenizers of one corpus)

torch.set_num_threads(1)
TRAINING = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=2)


def gold_config(out, teacher_tokenizer, **settings) -> GOLDConfig:
    """GOLD's config as the students stage builds it for ``cross_tokenizer: gold``."""
    return trainer_config(
        TRAINING,
        out,
        0,
        None,
        GOLDConfig,
        use_uld_loss=True,
        teacher_tokenizer_name_or_path=str(teacher_tokenizer),
        **settings,
    )


def test_a_config_without_the_teachers_tokenizer_is_refused_before_training(small, tmp_path):
    student = llama_model(small, hidden=32, layers=1, heads=1, intermediate=64, seed=2)
    config = trainer_config(TRAINING, tmp_path, 0, None, GOLDConfig)
    with pytest.raises(ValueError, match="use_uld_loss=True and teacher_tokenizer_name_or_path"):
        train_gold(student, student, small, [chat("q", "a")], config, tmp_path)


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_gold_trains_a_student_from_a_teacher_with_a_different_tokenizer(small, large, tmp_path, lmbda):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = llama_model(large, hidden=64, layers=2, heads=2, intermediate=128, seed=1)
    student = llama_model(small, hidden=32, layers=1, heads=1, intermediate=64, seed=2)
    assert teacher.config.vocab_size != student.config.vocab_size
    # the completions tokenize differently ("Answer" vs "Answ" + "er"): GOLD must align them by bytes
    assert large.tokenize("Answer") == ["Answer"] and small.tokenize("Answer") == ["Answ", "er"]
    rng = random.Random(0)
    pairs = [(rng.randrange(10), rng.randrange(10)) for _ in range(24)]
    rows = [chat(f"Solve step by step: {a}+{b}", f"{a}+{b}={a + b}\nAnswer: {a + b}") for a, b in pairs]
    large.save_pretrained(tmp_path / "teacher-tokenizer")  # GOLD loads the teacher's tokenizer from a folder
    config = gold_config(
        tmp_path, tmp_path / "teacher-tokenizer", lmbda=lmbda, temperature=1.0, max_completion_length=8
    )
    history = train_gold(student, teacher, small, rows, config, tmp_path)
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    # GOLD says which data each step trained on: the dataset's completions at λ = 0, the student's own at λ = 1
    assert all(("on_policy_loss" in e) == (lmbda == 1.0) for e in history if "loss" in e)
    assert json.loads((tmp_path / "log_history.json").read_text()) == history
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert reloaded.config.vocab_size == len(small)
    assert AutoTokenizer.from_pretrained(tmp_path / "model").get_vocab() == small.get_vocab()
