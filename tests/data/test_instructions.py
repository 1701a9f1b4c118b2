"""Instruction data (``source: instructions``) on the real files in data/ (T0's prompts, Self-Instruct's 252
user-oriented instructions), its bad inputs, ROUGE-L against hand counts, free-text curation, and the evaluation of
tiny models on it end to end without Prefect (ROUGE-L, the references' perplexity, agreement and KL on the teacher's
own answers), through to the report."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from data import instructions
from kdflow.config.data import DataSection, DataSource
from kdflow.config.fields import ROOT
from kdflow.config.loading import RecipeError
from kdflow.config.recipe import parse_recipe
from kdflow.store.data_files import DataError
from tasks.data import DATA, build_splits

torch.set_num_threads(1)
T0 = "data/t0-short/prompts.jsonl"
SELF_INSTRUCT = "data/self-instruct/user_oriented_instructions.jsonl"
FIELDS = {"id", "question", "rationale", "answer"}


def section(**splits) -> DataSection:
    return DataSection(
        source="instructions", transfer=T0, test=SELF_INSTRUCT, splits=splits or {"train": 2000, "test": 252}
    )


def lines(path: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / path).read_text().splitlines() if line.strip()]


# ---- the real files -------------------------------------------------------------------------------------


def test_the_real_files_give_disjoint_seeded_splits_with_the_pipelines_fields():
    splits = build_splits(section(train=2000, test=252))
    assert {k: len(v) for k, v in splits.items()} == {"train": 2000, "test": 252}
    assert all(set(r) == FIELDS for rows in splits.values() for r in rows)
    # test: Self-Instruct's 252, all of them, in file order; the question is the instruction, then a blank line and
    # the input where there is one; the reference is the rationale (SFT of data: gold) and the answer (ROUGE-L).
    source = lines(SELF_INSTRUCT)
    assert [r["id"] for r in splits["test"]] == [s["id"] for s in source]
    for row, s in zip(splits["test"], source):
        instance = s["instances"][0]
        assert row["rationale"] == row["answer"] == instance["output"]
        assert row["question"] == (
            f"{s['instruction'].strip()}\n\n{instance['input'].strip()}"
            if instance["input"].strip()
            else s["instruction"].strip()
        )
    assert sum("\n\n" in r["question"] for r in splits["test"]) > 150  # most user-oriented instructions have an input
    # train: T0 rows, each its prompt and reference completion
    t0 = {r["id"]: r for r in lines(T0)}
    assert len(t0) == 5383
    for row in splits["train"]:
        assert (
            row["question"] == t0[row["id"]]["prompt"]
            and row["rationale"] == row["answer"] == t0[row["id"]]["completion"]
        )


def test_splits_are_disjoint_seed_stable_and_independent_of_the_order_the_recipe_lists_them():
    a = build_splits(section(train=3000, valid=2383, test=20))
    ids = {name: [r["id"] for r in rows] for name, rows in a.items()}
    assert not set(ids["train"]) & set(ids["valid"]) and len(set(ids["train"]) | set(ids["valid"])) == 5383
    assert len(set(ids["test"])) == 20 and ids["test"] == sorted(ids["test"], key=lambda i: int(i.rsplit("_", 1)[1]))
    again = build_splits(section(test=20, valid=2383, train=3000))  # the same splits, listed in another order
    assert {name: [r["id"] for r in rows] for name, rows in again.items()} == ids
    other = DataSection(**{**section(train=3000, valid=2383, test=20).model_dump(), "seed": 1})
    moved = {name: [r["id"] for r in rows] for name, rows in build_splits(other).items()}
    assert moved["train"] != ids["train"] and moved["test"] != ids["test"]


def test_a_split_larger_than_its_file_names_the_split_and_the_row_count():
    with pytest.raises(
        DataError,
        match=r"data\.splits\.test asks for 253 rows but .*user_oriented_instructions\.jsonl has "
        r"252: lower it to at most 252",
    ):
        build_splits(section(train=10, test=253))
    with pytest.raises(DataError, match=r"data\.splits: train 5,000, valid 400 ask for 5,400 rows .* has 5,383"):
        build_splits(section(train=5000, valid=400, test=10))
    assert len(build_splits(section(train=5383, test=1))["train"]) == 5383  # the whole file is allowed


def test_bad_lines_fail_naming_file_and_line(tmp_path):
    transfer = tmp_path / "t.jsonl"
    transfer.write_text('{"id": "a", "prompt": "Say hi.", "completion": "hi"}\n{"id": "b", "completion": "x"}\n')
    with pytest.raises(DataError, match=rf"{transfer}:2: missing field\(s\) \['prompt'\]"):
        instructions.read_transfer(transfer)
    transfer.write_text(
        '{"id": "a", "prompt": "Say hi.", "completion": "hi"}\n\n{"id": "a", "prompt": "Hi?", "completion": "y"}\n'
    )
    with pytest.raises(DataError, match=rf"{transfer}:3: id 'a' is also the id of {transfer}:1"):
        instructions.read_transfer(transfer)
    test = tmp_path / "s.jsonl"
    test.write_text('{"id": "u0", "instruction": "Name a colour.", "instances": []}\n')
    with pytest.raises(
        DataError, match=rf"{test}:1: 'instances' must be a list whose first item has 'input' and 'output'"
    ):
        instructions.read_test(test)
    test.write_text('{"id": "u0", "instruction": "Name a colour.", "instances": [{"input": "", "output": " "}]}\n')
    with pytest.raises(DataError, match=rf"{test}:1: the instance's 'output' is empty"):
        instructions.read_test(test)


def test_the_data_key_holds_the_files_content(tmp_path):
    copy = tmp_path / "prompts.jsonl"
    copy.write_bytes((ROOT / T0).read_bytes())
    s = DataSection(source="instructions", transfer=str(copy), test=SELF_INSTRUCT, splits={"train": 5, "test": 5})
    key = DATA.key(section=s)
    with open(copy, "a") as f:
        f.write(json.dumps({"id": "t0-new", "prompt": "Say hi.", "completion": "hi"}) + "\n")
    assert DATA.key(section=s) != key


# ---- the recipe: files, and what free text cannot have -------------------------------------------------

RECIPE = """
run: {{name: instr}}
data:
  source: instructions
  transfer: {transfer}
  test: {test}
  splits: {{train: 40, test: 12}}
prompts: {{cot: prompts/instruct.jinja}}
teacher:
  architecture: {{hidden: 64, layers: 1, heads: 2, intermediate: 128}}
generation: {{splits: [train], max_new_tokens: 32}}
filters: {filters}
students:
  - {{name: seq-kd, data: teacher, architecture: {{hidden: 32, layers: 1, heads: 1, intermediate: 64}}}}
evaluation: {evaluation}
"""


def recipe(
    transfer=T0,
    test=SELF_INSTRUCT,
    filters="{correctness: false, dedup: {}, length: {max_tokens: 64}}",
    evaluation="{max_new_tokens: 32}",
):
    return parse_recipe(
        RECIPE.format(transfer=transfer, test=test, filters=filters, evaluation=evaluation), "instr.yaml"
    )


def test_a_recipe_on_instruction_files_loads():
    r = recipe()
    assert r.data.source is DataSource.instructions and r.data.transfer == T0 and r.data.test == SELF_INSTRUCT
    assert r.prompts.cot_text().strip().endswith("{{ question }}")


def test_a_missing_file_names_the_field_and_the_fix():
    with pytest.raises(
        RecipeError,
        match=r"data\.transfer.*no file at .*data/t0-short/nope\.jsonl: point data\.transfer at "
        r"an existing file, e\.g\. data/t0-short/prompts\.jsonl",
    ):
        recipe(transfer="data/t0-short/nope.jsonl")
    with pytest.raises(RecipeError, match=r"source 'instructions' needs data\.test"):
        parse_recipe(
            RECIPE.format(transfer=T0, test=SELF_INSTRUCT, filters="{correctness: false}", evaluation="{}").replace(
                f"  test: {SELF_INSTRUCT}\n", ""
            ),
            "instr.yaml",
        )


def test_what_needs_an_answer_checker_is_refused_for_free_text():
    with pytest.raises(
        RecipeError,
        match=r"filters\.correctness.*free text, with no answer checker: set "
        r"filters\.correctness: false",
    ):
        recipe(filters="{}")  # correctness is on by default
    with pytest.raises(RecipeError, match=r"self-consistency votes on final answers: remove filters\.self_consistency"):
        recipe(filters="{correctness: false, self_consistency: {}}")
    with pytest.raises(RecipeError, match=r"pass@k counts correct samples: remove evaluation\.pass_at_k"):
        recipe(evaluation="{pass_at_k: 2}")


def test_free_text_curation_runs_its_filters_and_never_a_checker():
    from data.checkers import answer_checker
    from kdflow.config.filters import FiltersSection
    from kdflow.curation.pipeline import curate

    check, extract = answer_checker(DataSource.instructions)
    with pytest.raises(TypeError, match="no answer checker"):
        check("x", "y")
    base = {"question": "Describe the sea.", "answer": "Blue and wide.", "finish_reason": "stop"}
    rows = [
        {**base, "id": "a", "text": "The sea is blue, wide and deep, and it moves all day long."},
        {**base, "id": "b", "text": "   "},
        {**base, "id": "c", "text": "The sea is", "finish_reason": "length"},
        {**base, "id": "d", "text": "The sea is blue, wide and deep, and it moves all night long."},
        {**base, "id": "e", "text": "Short."},
    ]
    section = FiltersSection(correctness=False, length={"min_tokens": 3}, dedup={"by": "text", "threshold": 0.4})
    kept, dropped = curate(rows, section, check, extract, tokens=[14, 0, 3, 14, 2])
    assert [r["id"] for r in kept] == ["a"]
    reasons = {r["id"]: set(r["reasons"]) for r in dropped}
    assert {"empty_answer"} <= reasons["b"] and "truncated" in reasons["c"] and "too_short" in reasons["e"]
    assert reasons["d"] == {"near_duplicate"}  # 8 of 14 word triples shared: Jaccard 0.57


# ---- ROUGE-L, counted by hand ---------------------------------------------------------------------------


def lcs(a: list[str], b: list[str]) -> int:
    """The longest common subsequence's length, by the textbook table."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


@pytest.mark.parametrize(
    "task, prediction, pred_tokens, ref_tokens",
    [
        # rouge-score's tokens: lower case, runs of [a-z0-9], Porter stems ("stars" -> "star", "sounds" -> "sound").
        (
            "user_oriented_task_234",
            "I think 3 stars.",
            ["i", "think", "3", "star"],
            ["3", "star"],
        ),  # LCS 2: F = 2·2/(4+2)
        (
            "user_oriented_task_144",
            "a_n = 9n - 4",
            ["a", "n", "9n", "4"],
            ["an", "9", "n", "4"],
        ),  # LCS 2 (n, 4): F = 4/8
        (
            "user_oriented_task_1",
            "The writer sounds confident.",
            ["the", "writer", "sound", "confid"],
            ["confid"],
        ),  # 2/5
    ],
)
def test_rouge_l_against_hand_counts_on_self_instruct_references(task, prediction, pred_tokens, ref_tokens):
    from kdflow.evaluation.free_text import SCORER, rouge_l

    reference = next(r for r in build_splits(section(train=1, test=252))["test"] if r["id"] == task)["answer"]
    assert SCORER._tokenizer.tokenize(prediction) == pred_tokens and SCORER._tokenizer.tokenize(reference) == ref_tokens
    n = lcs(pred_tokens, ref_tokens)
    precision, recall = n / len(pred_tokens), n / len(ref_tokens)
    by_hand = 100 * 2 * precision * recall / (precision + recall)
    assert by_hand == pytest.approx(
        {"user_oriented_task_234": 200 / 3, "user_oriented_task_144": 50.0, "user_oriented_task_1": 40.0}[task]
    )
    assert rouge_l(prediction, reference) == pytest.approx(by_hand)
    assert rouge_l(f"  {prediction}\n", reference) == pytest.approx(by_hand)  # surrounding white space is stripped
    assert rouge_l(reference, reference) == 100.0 and rouge_l("", reference) == 0.0


def test_mean_rouge_l_over_rows_and_a_failed_request_scores_zero():
    from kdflow.evaluation.free_text import scored

    mean, rows = scored(
        [
            {"id": 1, "answer": "3 stars", "text": "I think 3 stars."},
            {"id": 2, "answer": "3 stars", "text": "3 stars"},
            {"id": 3, "answer": "3 stars", "text": None},
        ]
    )
    assert [r["rouge_l"] for r in rows] == pytest.approx([200 / 3, 100.0, 0.0])
    assert mean == pytest.approx((200 / 3 + 100) / 3)


# ---- tiny models evaluated end to end, without Prefect --------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The data stage on the real files, a teacher and a student (tiny Llamas sharing one tokenizer), the teacher
    evaluated, then the student with the teacher's evaluation."""
    from kdflow.config.evaluation import EvaluationSection
    from kdflow.store.model_folders import write_location
    from kdflow.store.outputs import building, existing_output, finish
    from kdflow.training.tiny_models import llama_model, train_tokenizer
    from tasks.data import make_data
    from tasks.evaluate import evaluate_model

    run = tmp_path_factory.mktemp("instructions")
    data = make_data.fn(run, section(train=8, test=6))
    rows = pd.read_parquet(Path(data.path) / "test.parquet").to_dict("records")
    tokenizer = train_tokenizer([f"{r['question']}\n{r['answer']}" for r in rows] * 5, vocab_size=400)

    def model(name: str, seed: int, hidden: int):
        key = name.ljust(64, "0")
        with building(run, name, key) as tmp:
            llama_model(
                tokenizer, hidden=hidden, layers=1, heads=2, intermediate=64, seed=seed, max_positions=4096
            ).save_pretrained(tmp / "model")
            tokenizer.save_pretrained(tmp / "model")
            write_location(tmp, "model")
            finish(tmp, name, key, inputs={})
        return existing_output(run, name, key)

    teacher, student = model("teacher", 1, 64), model("students", 2, 32)
    settings = EvaluationSection(max_new_tokens=8, batch_size=8)
    template = (ROOT / "prompts" / "instruct.jinja").read_text()
    t = evaluate_model.fn(run, settings, template, DataSource.instructions, teacher, teacher, data)
    s = evaluate_model.fn(run, settings, template, DataSource.instructions, student, teacher, data, teacher_eval=t)
    return {
        "rows": rows,
        "teacher": t,
        "student": s,
        "data": data,
        "settings": settings,
        "template": template,
        "models": (teacher, student),
        "tokenizer": tokenizer,
    }


def predictions(ref) -> pd.DataFrame:
    return pd.read_parquet(Path(ref.path) / "predictions.parquet")


def test_rouge_l_and_the_references_perplexity(evaluated):
    from kdflow.evaluation.free_text import rouge_l

    for who in ("teacher", "student"):
        m, p = evaluated[who].manifest()["metrics"], predictions(evaluated[who])
        assert m["rows"] == 6 and "accuracy" not in m and "correct" not in p
        assert list(p["id"]) == [r["id"] for r in evaluated["rows"]]
        assert list(p["rouge_l"]) == pytest.approx([rouge_l(t, a) for t, a in zip(p["text"], p["answer"])])
        assert m["rouge_l"] == pytest.approx(p["rouge_l"].mean()) and 0 <= m["rouge_l"] <= 100
        assert m["perplexity"] > 1 and m["reference_tokens"] > 0
    # the references' perplexity is scored on the rationale: the same token count for both (one tokenizer)
    t, s = (evaluated[w].manifest()["metrics"] for w in ("teacher", "student"))
    assert t["reference_tokens"] == s["reference_tokens"]


def test_agreement_and_kl_are_measured_on_the_teachers_own_answers(evaluated):
    from kdflow.evaluation.free_text import TEACHER_ANSWER, with_teacher_answers
    from kdflow.evaluation.quality import reference_sequences, score_reference
    from kdflow.evaluation.quantize import load
    from kdflow.store.model_folders import model_location

    t, s = (evaluated[w].manifest()["metrics"] for w in ("teacher", "student"))
    assert t["agreement"] == 1.0 and t["kl"] == pytest.approx(0.0, abs=1e-6)
    assert 0 <= s["agreement"] <= 1 and s["kl"] > 0
    assert s["teacher_answer_tokens"] == t["teacher_answer_tokens"] > 0
    # the same figures, scored by hand on the teacher's predictions
    answers = predictions(evaluated["teacher"]).to_dict("records")
    teacher, student = (load(model_location(ref))[0] for ref in evaluated["models"])
    rows = with_teacher_answers(evaluated["rows"], answers)
    sequences = reference_sequences(evaluated["tokenizer"], rows, evaluated["template"], field=TEACHER_ANSWER)
    again = score_reference(student, evaluated["tokenizer"], sequences, 8, teacher=teacher)
    assert again["agreement"] == pytest.approx(s["agreement"]) and again["kl"] == pytest.approx(s["kl"], rel=1e-5)
    assert again["reference_tokens"] == s["teacher_answer_tokens"]


def test_the_evaluate_key_holds_the_teachers_evaluation_where_it_is_used(evaluated):
    from tasks.evaluate import EVALUATE

    teacher, student = evaluated["models"]
    args = dict(
        section=evaluated["settings"],
        template=evaluated["template"],
        source=DataSource.instructions,
        model=student,
        teacher=teacher,
        data=evaluated["data"],
    )
    assert EVALUATE.key(**args, teacher_eval=evaluated["teacher"]) != EVALUATE.key(**args)
    assert Path(evaluated["student"].path).name == EVALUATE.key(**args, teacher_eval=evaluated["teacher"])[:16]
    # without it (the other sources) the key is what it was before teacher_eval existed
    assert EVALUATE.key(**args) == EVALUATE.key(**args, teacher_eval=None)
    assert "teacher_eval" not in EVALUATE.inputs(**args)


def test_a_students_free_text_evaluation_without_the_teachers_answers_is_refused(evaluated, tmp_path):
    from kdflow.evaluation.free_text import evaluate_free_text
    from kdflow.store.model_folders import model_location

    teacher, student = (model_location(ref) for ref in evaluated["models"])
    with pytest.raises(ValueError, match="pass the teacher's evaluation of the same split"):
        evaluate_free_text(student, teacher, evaluated["rows"], evaluated["template"], evaluated["settings"], None)
    with pytest.raises(ValueError, match="no answer for 1 of the 6 rows"):
        evaluate_free_text(
            student,
            teacher,
            evaluated["rows"],
            evaluated["template"],
            evaluated["settings"],
            predictions(evaluated["teacher"]).to_dict("records")[1:],
        )


def test_the_report_shows_rouge_l_instead_of_accuracy(evaluated):
    from kdflow.reporting import compare
    from kdflow.reporting.plots import plot_tradeoff
    from kdflow.reporting.run_report import build_report, render_markdown, table_rows

    t, s = (evaluated[w].manifest()["metrics"] for w in ("teacher", "student"))
    gold = {**s, "rouge_l": s["rouge_l"] / 2, "data": "gold"}
    curation = {"input_rows": 8, "kept": 8, "dropped": 0, "drop_reasons": {}}
    report = build_report("instr", t, {"baseline": gold, "seq-kd": {**s, "data": "teacher"}}, curation)
    assert report["gap_closure"]["metric"] == "rouge_l" and "on ROUGE-L" in report["gap_closure"]["note"]
    expected = (
        (s["rouge_l"] - gold["rouge_l"]) / (t["rouge_l"] - gold["rouge_l"]) if t["rouge_l"] > gold["rouge_l"] else None
    )
    assert report["students"]["seq-kd"]["gap_closure"] == (pytest.approx(expected) if expected is not None else None)
    md = render_markdown(report)
    assert "| model | trained on | ROUGE-L | gap closed |" in md and "| accuracy |" not in md
    assert f"ROUGE-L {s['rouge_l']:.1f} vs the teacher's {t['rouge_l']:.1f}" in md
    assert "teacher-forced on the teacher's own greedy answers" in md and "rouge-score" in md
    assert all("rouge_l" in row and "accuracy" not in row for row in table_rows(report))
    table = compare.render({"instr": report})
    assert "| ROUGE-L |" in table and "| accuracy |" not in table
    assert plot_tradeoff(report).startswith(b"\x89PNG")  # ROUGE-L against parameters (no latency measured here)


# ---- the fifth audit: values of the wrong JSON type -----------------------------------------------------


def test_a_null_test_input_is_no_input_and_one_not_text_is_refused(tmp_path):
    test = tmp_path / "s.jsonl"
    test.write_text('{"id": "s1", "instruction": "Do 1", "instances": [{"input": null, "output": "o"}]}\n')
    assert instructions.read_test(test)[0]["question"] == "Do 1"  # not "Do 1\n\nNone"
    for value, kind in (("0", "a number"), ('["a"]', "a list"), ("true", "a boolean")):
        test.write_text(f'{{"id": "s1", "instruction": "Do 1", "instances": [{{"input": {value}, "output": "o"}}]}}\n')
        with pytest.raises(DataError, match=rf"{test}:1: the instance's 'input' holds {kind}, not text; write it as"):
            instructions.read_test(test)


@pytest.mark.parametrize("value, kind", [("null", "null"), ("3", "a number"), ('["a", "b"]', "a list")])
def test_a_test_output_that_is_not_text_is_refused(tmp_path, value, kind):
    test = tmp_path / "s.jsonl"
    test.write_text(
        '{"id": "s0", "instruction": "Do 0", "instances": [{"input": "", "output": "o"}]}\n'
        f'{{"id": "s1", "instruction": "Do 1", "instances": [{{"input": "", "output": {value}}}]}}\n'
    )
    with pytest.raises(
        DataError, match=rf"{test}:2: the instance's 'output' holds {kind}, not text: there is no reference"
    ):
        instructions.read_test(test)


@pytest.mark.parametrize(
    "value, problem",
    [('""', "is empty"), ('"  "', "is empty"), ("null", "holds null, not text"), ('["a", "b"]', "holds a list")],
)
def test_a_transfer_completion_that_is_empty_or_not_text_is_refused(tmp_path, value, problem):
    transfer = tmp_path / "t.jsonl"
    transfer.write_text(
        '{"id": "a", "prompt": "Say hi.", "completion": "hi"}\n'
        f'{{"id": "b", "prompt": "Say bye.", "completion": {value}}}\n'
    )
    with pytest.raises(DataError, match=rf"{transfer}:2: field 'completion' {problem}.*(fill it in|JSON string)"):
        instructions.read_transfer(transfer)


def test_a_numeric_prompt_is_named_not_text_rather_than_empty(tmp_path):
    transfer = tmp_path / "t.jsonl"
    transfer.write_text('{"id": "a", "prompt": 5, "completion": "hi"}\n')
    with pytest.raises(
        DataError,
        match=rf"{transfer}:1: field 'prompt' holds a number \(5\), not text; write the prompt as",
    ):
        instructions.read_transfer(transfer)
    transfer.write_text('{"id": "a", "prompt": ["x"], "completion": "hi"}\n')
    with pytest.raises(DataError, match=rf"{transfer}:1: field 'prompt' holds a list"):
        instructions.read_transfer(transfer)
    transfer.write_text('{"id": "a", "prompt": " ", "completion": "hi"}\n')  # empty text is still "empty"
    with pytest.raises(DataError, match=rf"{transfer}:1: empty prompt in field 'prompt'"):
        instructions.read_transfer(transfer)
