"""Tokenizer compatibility: identical tokenizers pass, a different vocabulary / special token / template fails up
front with the fix in the message, and ``cross_tokenizer: gold`` lets a mismatch through to TRL's GOLD, which
trains a tiny student from a tiny teacher with a different tokenizer."""

import json
import math
import random

import pytest
import torch

from kdflow.config.templates import chat
from kdflow.training.tiny_models import llama_model, train_tokenizer
from kdflow.training.tokenizer_compat import TokenizerMismatch, check_tokenizers, train_gold

torch.set_num_threads(1)
CORPUS = [f"Solve step by step: {a}+{b}\n{a}+{b}={a + b}\nAnswer: {a + b}" for a in range(10) for b in range(10)]


@pytest.fixture(scope="module")
def small():
    return train_tokenizer(CORPUS, 48)


@pytest.fixture(scope="module")
def large():
    return train_tokenizer(CORPUS, 64)


def test_identical_tokenizers_pass(small):
    assert check_tokenizers(small, train_tokenizer(CORPUS, 48), cross_tokenizer=None) == []


def test_different_vocabulary_fails_up_front_naming_sizes_tokens_and_the_fix(small, large):
    with pytest.raises(TokenizerMismatch) as info:
        check_tokenizers(large, small, cross_tokenizer=None)
    message = str(info.value)
    assert f"teacher {len(large.get_vocab())} tokens, student {len(small.get_vocab())}" in message
    assert "first id " in message and "vs student" in message  # quotes the first differing tokens
    assert "set kd.cross_tokenizer: gold" in message and "student with the teacher's tokenizer" in message
    assert isinstance(info.value, ValueError)


def test_a_different_special_token_or_template_fails(small):
    other = train_tokenizer(CORPUS, 48)
    other.chat_template = small.chat_template.replace("<|end|>", "<|end|>\n")
    with pytest.raises(TokenizerMismatch, match="chat template differs .*first difference at char"):
        check_tokenizers(small, other, cross_tokenizer=None)
    other = train_tokenizer(CORPUS, 48)
    other.pad_token = other.eos_token
    with pytest.raises(TokenizerMismatch, match=r"pad token differs \(teacher '<\|pad\|>' id 0, student '<\|end\|>'"):
        check_tokenizers(small, other, cross_tokenizer=None)


def test_gold_lets_a_mismatch_through_and_reports_it(small, large):
    differences = check_tokenizers(large, small, cross_tokenizer="gold")
    assert len(differences) == 1 and differences[0].startswith("vocabularies differ")


def test_an_unknown_cross_tokenizer_method_is_refused(small):
    with pytest.raises(ValueError, match="kd.cross_tokenizer must be one of"):
        check_tokenizers(small, small, cross_tokenizer="uld")


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
    training = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=2)
    history = train_gold(
        student, teacher, small, large, rows, training, tmp_path, seed=0, lmbda=lmbda, temperature=1.0, max_new_tokens=8
    )
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    # GOLD says which data each step trained on: the dataset's completions at λ = 0, the student's own at λ = 1
    assert all(("on_policy_loss" in e) == (lmbda == 1.0) for e in history if "loss" in e)
    assert json.loads((tmp_path / "log_history.json").read_text()) == history
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert reloaded.config.vocab_size == len(small)
    assert AutoTokenizer.from_pretrained(tmp_path / "model").get_vocab() == small.get_vocab()
