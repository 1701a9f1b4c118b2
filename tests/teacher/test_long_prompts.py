"""A prompt that does not fit the teacher's context with max_new_tokens is a failure row, never run: positions past
the context give garbage, and a huge prompt's attention alone takes hours (a 10 MB question to a 256-position teacher
was still in generation 300 s later, in issue 23's repeat audit)."""

from __future__ import annotations

from kdflow.config.generation import GenerationSection
from kdflow.teacher.generation import failure_table, hf_answers
from kdflow.teacher.hf_generate import TOO_LONG, generate, load
from kdflow.training.tiny_models import llama_model, train_tokenizer
from tests.conftest import TINY_TEACHER_CORPUS


def teacher_folder(folder, positions=64):
    tokenizer = train_tokenizer(TINY_TEACHER_CORPUS, 48)
    llama_model(
        tokenizer, hidden=32, layers=1, heads=2, intermediate=64, seed=0, max_positions=positions
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_prompt_past_the_context_is_not_run_and_the_others_are(tmp_path):
    model, tokenizer = load(teacher_folder(tmp_path))
    out = generate(model, tokenizer, ["1+2", "1+2 " * 2000, "3+4"], max_new_tokens=8, batch_size=4)
    assert out[1]["finish_reason"] == TOO_LONG and out[1]["text"] == "" and out[1]["completion_tokens"] == 0
    assert out[1]["prompt_tokens"] + 8 > model.config.max_position_embeddings
    assert all(o["finish_reason"] in ("stop", "length") and o["completion_tokens"] >= 1 for o in (out[0], out[2]))


def test_a_prompt_that_fits_only_without_max_new_tokens_is_refused_too(tmp_path):
    model, tokenizer = load(teacher_folder(tmp_path))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+2"}], tokenize=False, add_generation_prompt=True
    )
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    limit = model.config.max_position_embeddings
    fits, too_long = (
        generate(model, tokenizer, ["1+2"], limit - n, 1),
        generate(model, tokenizer, ["1+2"], limit - n + 1, 1),
    )
    assert fits[0]["finish_reason"] != TOO_LONG and too_long[0]["finish_reason"] == TOO_LONG


def test_the_teachers_answers_name_the_prompt_that_is_too_long_with_the_fix(tmp_path):
    rows = [
        {"id": "a", "sample": 0, "split": "train", "teacher_prompt": "1+2"},
        {"id": "b", "sample": 0, "split": "train", "teacher_prompt": "1+2 " * 2000},
    ]
    section = GenerationSection(backend="hf", splits=["train"], max_new_tokens=8, batch_size=4)
    answers, failed, acct = hf_answers(section, teacher_folder(tmp_path), rows)
    assert [a["id"] for a in answers] == ["a"] and answers[0]["ok"]
    assert [f["id"] for f in failed] == ["b"] and failed[0]["reason"] == "bad_request" and not failed[0]["ok"]
    assert "max_new_tokens 8 is longer than the teacher's context" in failed[0]["error"]
    assert "shorten" in failed[0]["error"]
    assert (acct.requests, acct.answers, acct.failures, acct.failures_by_reason) == (2, 1, 1, {"bad_request": 1})
    table = failure_table(rows, failed)
    assert table["id"].tolist() == ["b"] and table["reason"].tolist() == ["bad_request"]
