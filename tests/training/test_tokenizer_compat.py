"""Tokenizer compatibility: identical tokenizers pass, a different vocabulary / special token / template fails up
front with the fix in the message, and ``cross_tokenizer: gold`` lets a mismatch through (to TRL's GOLD:
tests/training/test_gold.py)."""

import pytest

from kdflow.training.tiny_models import train_tokenizer
from kdflow.training.tokenizer_compat import TokenizerMismatch, check_tokenizers

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
