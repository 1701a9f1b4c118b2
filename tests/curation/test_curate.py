"""Curation: every filter's drops carry its reason, kept + dropped = input, self-consistency, the report."""

import json
from pathlib import Path

import pytest

from data.arithmetic import check_answer, extract_answer
from data.gsm8k import check_answer as math_check
from data.gsm8k import final_answer as math_extract
from kdflow.config.filters import FiltersSection
from kdflow.curation import drop_report
from kdflow.curation.filters import Reason, parse_score
from kdflow.curation.pipeline import curate, filter_by_correctness, reason_counts


def answer(i, text, finish="stop", gold="15", question="12+3", sample=None, tokens=None):
    row = {
        "id": f"r{i}",
        "question": question,
        "answer": gold,
        "text": text,
        "finish_reason": finish,
        "completion_tokens": tokens if tokens is not None else len(text),
    }
    if sample is not None:
        row["sample"] = sample
    return row


ROWS = [
    answer(0, "12+3=15\nAnswer: 15"),
    answer(1, "12+3=16\nAnswer: 16"),
    answer(2, "12+3=15\n"),
    answer(3, "12+3=15\n12+3=15\n12+", finish="length"),
    answer(4, "12+3=15\nAnswer: 15", finish="length"),
    answer(5, "12+3=15\nAnswer: 15"),
]


def by_id(dropped):
    return {f"{r['id']}/{r['sample']}": r["reasons"] for r in dropped}


def filters(**settings) -> FiltersSection:
    return FiltersSection.model_validate(settings)


def test_kept_plus_dropped_is_the_input_and_every_drop_has_a_reason():
    kept, dropped = filter_by_correctness(ROWS, check_answer, extract_answer)
    assert [r["id"] for r in kept] == ["r0", "r5"]
    assert sorted(r["id"] for r in kept + dropped) == sorted(r["id"] for r in ROWS)
    reasons = {r["id"]: r["reasons"] for r in dropped}
    assert reasons == {
        "r1": ["wrong_answer"],
        "r2": ["no_final_answer"],
        "r3": ["truncated", "no_final_answer"],
        "r4": ["truncated"],
    }
    assert all(r["text"] for r in dropped)  # the raw text stays with the drop
    assert reason_counts(dropped) == {"wrong_answer": 1, "no_final_answer": 2, "truncated": 2}


def test_nothing_dropped_when_all_are_right():
    kept, dropped = filter_by_correctness([ROWS[0], ROWS[5]], check_answer, extract_answer)
    assert len(kept) == 2 and dropped == []


def test_each_generic_filter_drops_with_its_own_reason():
    rows = [
        answer(0, "12+3=15\nAnswer: 15", tokens=6),
        answer(1, "   ", tokens=0),
        answer(2, "Answer: 15", tokens=2),  # too short
        answer(3, "12+3=15\n" * 20 + "Answer: 15", tokens=90),  # too long
        answer(4, "I'm sorry, I can't help with that. Answer: 15", tokens=8),
        answer(5, "12+3=15\nAnswer: 15", tokens=6, question="12+3"),  # an exact copy of r0
        answer(6, "12 + 3 = 15.\nAnswer: 15", tokens=6),  # the same words: a copy once normalised
        answer(7, "twelve plus three\nAnswer: 15", tokens=6, question="3+12"),
    ]
    section = filters(
        length={"min_tokens": 3, "max_tokens": 50}, patterns={"required": r"\d ?\+ ?\d|plus"}, dedup={"near": False}
    )
    kept, dropped = curate(rows, section, check_answer, extract_answer, tokens=[r["completion_tokens"] for r in rows])
    assert len(kept) + len(dropped) == len(rows)
    assert [r["id"] for r in kept] == ["r0", "r7"]
    assert by_id(dropped) == {
        "r1/0": ["empty_answer", "too_short", "format_mismatch", "no_final_answer"],
        "r2/0": ["too_short", "format_mismatch"],
        "r3/0": ["too_long"],
        "r4/0": ["refusal", "format_mismatch"],
        "r5/0": ["duplicate"],
        "r6/0": ["duplicate"],
    }
    details = {r["id"]: r["detail"] for r in dropped}
    assert details["r5"] == "duplicate of r0/0"


def test_near_duplicates_are_dropped_and_point_at_the_kept_row():
    base = (
        "First add twelve and three to get fifteen, then check the sum once more by counting up from twelve "
        "one step at a time until three steps are done, and write the total down carefully.\nAnswer: 15"
    )
    rows = [
        answer(0, base),
        answer(1, base.replace("carefully", "neatly")),
        answer(2, "12+3=15\nAnswer: 15"),
        answer(3, "Start from twelve, count three more: thirteen, fourteen, fifteen. Answer: 15"),
    ]
    kept, dropped = curate(rows, filters(dedup={"by": "text", "threshold": 0.6}), check_answer, extract_answer)
    assert [r["id"] for r in kept] == ["r0", "r2", "r3"]
    assert by_id(dropped) == {"r1/0": ["near_duplicate"]} and dropped[0]["detail"] == "near_duplicate of r0/0"


def test_self_consistency_with_gold_keeps_the_correct_samples_under_the_policy():
    rows = [
        answer(0, t, sample=s)
        for s, t in enumerate(["12+3=15\nAnswer: 15", "Answer: 16", "12+3=15, so\nAnswer: 15", "Answer: 15"])
    ]
    for policy, k, expected in [("all", 1, [0, 2, 3]), ("shortest", 1, [3]), ("best_k", 2, [3, 0])]:
        kept, dropped = curate(rows, filters(self_consistency={"policy": policy, "k": k}), check_answer, extract_answer)
        assert sorted(r["sample"] for r in kept) == sorted(expected), policy
        assert by_id(dropped)["r0/1"] == ["wrong_answer"]
        assert all(reasons == ["not_selected"] for name, reasons in by_id(dropped).items() if name != "r0/1")


def test_self_consistency_without_gold_keeps_the_majority_answer():
    texts = ["so #### 72", "it is 72.0 dollars, #### 72.0", "#### 70", "\\boxed{72}", "I do not know"]
    rows = [answer(0, t, gold=None, sample=s, question="q") for s, t in enumerate(texts)]
    rows += [answer(1, t, gold="", sample=s, question="q2") for s, t in enumerate(["#### 3", "#### 4"])]
    kept, dropped = curate(rows, filters(self_consistency={"policy": "all"}), math_check, math_extract)
    assert [(r["id"], r["sample"]) for r in kept] == [("r0", 0), ("r0", 1), ("r0", 3)]
    assert by_id(dropped) == {
        "r0/2": ["minority_answer"],
        "r0/4": ["no_final_answer"],
        "r1/0": ["no_majority"],
        "r1/1": ["no_majority"],
    }


def test_judge_filter_scores_with_planted_replies_and_keeps_the_reply():
    rows = [answer(i, f"12+3=15 ({i})\nAnswer: 15") for i in range(4)] + [answer(4, "Answer: 16")]
    replies = {"(0)": "Clear.\nScore: 9", "(1)": "Weak.\nScore: 3", "(2)": "no score here", "(3)": "Score: 6"}
    prompts_seen = []

    def complete(prompts):
        prompts_seen.extend(prompts)
        return [next(v for k, v in replies.items() if k in p) for p in prompts]

    template = "Q: {{ question }}\nA: {{ answer }}\nScore:"
    kept, dropped = curate(
        rows, filters(judge={"threshold": 6}), check_answer, extract_answer, judge_template=template, complete=complete
    )
    assert len(prompts_seen) == 4  # the wrong answer never reaches the (expensive) judge
    assert [r["id"] for r in kept] == ["r0", "r3"] and kept[0]["judge_score"] == 9.0
    assert by_id(dropped) == {"r1/0": ["judge_low_score"], "r2/0": ["judge_unparsed"], "r4/0": ["wrong_answer"]}
    assert {r["id"]: r["judge_reply"] for r in dropped if r["id"] != "r4"} == {
        "r1": replies["(1)"],
        "r2": replies["(2)"],
    }
    with pytest.raises(ValueError, match="judge"):
        curate(rows, filters(judge={}), check_answer, extract_answer)
    assert parse_score("Score: 4\n...\nScore: 7.5") == 7.5 and parse_score("none") is None


def test_report_counts_reasons_and_histograms_every_row(tmp_path):
    kept, dropped = filter_by_correctness(ROWS, check_answer, extract_answer)
    summary = drop_report.write(tmp_path, kept, dropped)
    assert summary["input_rows"] == 6 and summary["kept"] == 2 and summary["dropped"] == 4
    assert {r["reason"]: r["rows"] for r in summary["reasons"]} == reason_counts(dropped)
    hist = summary["length_histogram"]
    assert sum(h["kept"] for h in hist) == 2 and sum(h["dropped"] for h in hist) == 4
    md = (tmp_path / "report.md").read_text()
    assert "| truncated | 2 |" in md and "lengths.png" in md
    assert (tmp_path / "lengths.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report.json").read_text())["kept"] == 2


def test_reason_codes_are_an_enum_of_stable_strings():
    assert Reason("near_duplicate") is Reason.near_duplicate and Reason.truncated.value == "truncated"


def answers_and_teacher(run_dir, rows, tok, max_positions):
    """Finished generate and teacher outputs: ``rows`` as the teacher's answers, a tiny untrained Llama with ``tok``
    as the teacher (the judge filter asks it)."""
    import pandas as pd

    from kdflow.store.model_folders import write_location
    from kdflow.store.outputs import building, existing_output, finish
    from kdflow.training.tiny_models import llama_model

    def stage(name, build):
        with building(run_dir, name, name.ljust(64, "0")) as tmp:
            build(tmp)
            finish(tmp, name, name.ljust(64, "0"), inputs={})
        return existing_output(run_dir, name, name.ljust(64, "0"))

    def teacher_folder(tmp):
        llama_model(
            tok, hidden=64, layers=1, heads=2, intermediate=64, seed=0, max_positions=max_positions
        ).save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        write_location(tmp, "model")

    answers = stage("generate", lambda tmp: pd.DataFrame(rows).to_parquet(tmp / "answers.parquet", index=False))
    return answers, stage("teacher", teacher_folder)


@pytest.mark.slow
def test_curate_stage_writes_datasets_report_and_manifest(prefect_server, tmp_path):
    """The stage body on GSM8K-style answers with n samples per prompt: the student's tokenizer for lengths,
    self-consistency, dedup, and a tiny HF teacher as the judge (untrained: its replies carry no score, so
    every judged row must be dropped with judge_unparsed, its reply kept)."""
    import pandas as pd

    from kdflow.config.data import DataSource
    from kdflow.training.tiny_models import train_tokenizer
    from tasks.curate import filter_answers

    texts = ["5+5=10, so #### 10", "It is \\boxed{10}", "#### 11", "I'm sorry, I can't help with that.", "#### 10"]
    rows = [
        {
            "id": "q0",
            "split": "prompts",
            "question": "What is 5+5?",
            "answer": "10",
            "sample": s,
            "text": t,
            "finish_reason": "stop",
            "completion_tokens": len(t),
        }
        for s, t in enumerate(texts)
    ]
    rows += [
        {
            "id": "q1",
            "split": "prompts",
            "question": "What is 2+2?",
            "answer": "4",
            "sample": 0,
            "text": "Let me think about it step by",
            "finish_reason": "length",
            "completion_tokens": 96,
        }
    ]
    tok = train_tokenizer(texts + ["Score: 7", "What is 5+5?"], vocab_size=80)
    tok.save_pretrained(tmp_path / "student-tokenizer")

    answers, teacher = answers_and_teacher(tmp_path, rows, tok, max_positions=1024)
    section = filters(
        length={"min_tokens": 2, "tokenizer": str(tmp_path / "student-tokenizer")},
        patterns={},
        self_consistency={"policy": "all"},
        dedup={"by": "question_and_text"},
        judge={"threshold": 5, "max_new_tokens": 4},
    )
    ref = filter_answers.fn(tmp_path, section, DataSource.gsm8k, answers, teacher)
    out = Path(ref.path)
    kept, dropped = pd.read_parquet(out / "kept.parquet"), pd.read_parquet(out / "dropped.parquet")
    assert len(kept) + len(dropped) == len(rows) and len(kept) == 0
    reasons = {f"{r.id}/{r.sample}": list(r.reasons) for r in dropped.itertuples()}
    assert reasons["q0/2"] == ["wrong_answer"] and reasons["q0/3"] == ["refusal", "no_final_answer"]
    assert reasons["q1/0"] == ["truncated", "no_final_answer"]
    assert reasons["q0/0"] == reasons["q0/1"] == reasons["q0/4"] == ["judge_unparsed"]
    judged = dropped[(dropped["id"] == "q0") & (dropped["sample"] == 0)]
    assert isinstance(judged["judge_reply"].item(), str) and judged["detail"].item() == "judge gave no score"
    m = ref.manifest()
    assert (m["input_rows"], m["kept"], m["dropped"]) == (6, 0, 6) and m["drop_reasons"]["judge_unparsed"] == 3
    assert m["teacher_failures"] == 0
    assert {"report.md", "report.json", "lengths.png"} <= {p.name for p in out.iterdir()}
    assert filter_answers.fn(tmp_path, section, DataSource.gsm8k, answers, teacher) == ref  # the same content, kept


# ---- a verification that runs away is a drop with its reason, not a hung stage ---------------------------

RUNAWAY = "so the answer is #### 9^9^9^9"  # a power math-verify would compute for ever


@pytest.fixture
def short_verify_bound(monkeypatch):
    monkeypatch.setattr("kdflow.curation.verify.TIMEOUT_S", 1.0)


def in_a_thread(fn, *args):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # as Prefect runs a task; the timeout only guards against a hang
        return pool.submit(fn, *args).result(timeout=300)


def test_an_answer_math_verify_cannot_finish_is_dropped_as_verify_timeout(short_verify_bound):
    rows = [answer(0, "5+5=10, so #### 10", gold="10"), answer(1, RUNAWAY, gold="10"), answer(2, "#### 11", gold="10")]
    kept, dropped = in_a_thread(curate, rows, FiltersSection(), math_check, math_extract)
    assert [r["id"] for r in kept] == ["r0"]
    assert by_id(dropped) == {"r1/0": ["verify_timeout"], "r2/0": ["wrong_answer"]}
    (timed_out,) = [r for r in dropped if r["id"] == "r1"]
    assert timed_out["text"] == RUNAWAY and "9^9^9^9" in timed_out["detail"] and "TIMEOUT_S" in timed_out["detail"]


def test_self_consistency_without_gold_votes_without_the_runaway_answer(short_verify_bound):
    texts = ["#### 72", RUNAWAY, "#### 72.0", "#### 70"]
    rows = [answer(0, t, gold=None, sample=s, question="q") for s, t in enumerate(texts)]
    kept, dropped = in_a_thread(curate, rows, filters(self_consistency={"policy": "all"}), math_check, math_extract)
    assert [r["sample"] for r in kept] == [0, 2]
    assert by_id(dropped) == {"r0/1": ["verify_timeout"], "r0/3": ["minority_answer"]}


def test_curate_stage_keeps_a_verify_timeout_in_the_drops_dataset(prefect_server, tmp_path, short_verify_bound):
    import pandas as pd

    from kdflow.config.data import DataSource
    from kdflow.store.outputs import building, existing_output, finish
    from tasks.curate import filter_answers

    rows = [
        {
            "id": f"q{i}",
            "split": "prompts",
            "question": "What is 5+5?",
            "answer": "10",
            "sample": 0,
            "text": t,
            "finish_reason": "stop",
            "completion_tokens": len(t),
        }
        for i, t in enumerate(["#### 10", RUNAWAY])
    ]
    with building(tmp_path, "generate", "g" * 64) as tmp:
        pd.DataFrame(rows).to_parquet(tmp / "answers.parquet", index=False)
        finish(tmp, "generate", "g" * 64, inputs={})
    ref = filter_answers.fn(
        tmp_path, FiltersSection(), DataSource.gsm8k, existing_output(tmp_path, "generate", "g" * 64)
    )
    dropped = pd.read_parquet(Path(ref.path) / "dropped.parquet")
    assert dropped["id"].tolist() == ["q1"] and list(dropped["reasons"].item()) == ["verify_timeout"]
    assert dropped["text"].item() == RUNAWAY and "9^9^9^9" in dropped["detail"].item()
    assert ref.manifest()["drop_reasons"] == {"verify_timeout": 1} and ref.manifest()["kept"] == 1


@pytest.mark.slow
def test_editing_the_judge_filter_template_reruns_the_curate_stage(prefect_server, tmp_path):
    """The judge filter's prompt is content of the curate stage for Prefect's key too, not only for the body's:
    an edit of the template file (the recipe names a path, not the text) must rerun the stage, not return the
    output judged with the old prompt from Prefect's cache."""
    from prefect import flow

    from kdflow.config.data import DataSource
    from kdflow.training.tiny_models import train_tokenizer
    from tasks.curate import filter_answers

    rows = [
        {
            "id": "q0",
            "split": "prompts",
            "question": "What is 5+5?",
            "answer": "10",
            "sample": 0,
            "text": "#### 10",
            "finish_reason": "stop",
            "completion_tokens": 3,
        }
    ]
    tok = train_tokenizer(["#### 10", "Score: 7", "What is 5+5?"], vocab_size=60)

    answers, teacher = answers_and_teacher(tmp_path, rows, tok, max_positions=256)
    template = tmp_path / "prompts" / "my_judge.jinja"
    template.parent.mkdir()
    template.write_text("Rate this answer: {{ answer }}")
    section = FiltersSection.model_validate(
        {"judge": {"template": str(template), "max_new_tokens": 2}}, context={"recipe_dir": str(tmp_path)}
    )

    @flow
    def curate_flow():
        return filter_answers(tmp_path, section, DataSource.gsm8k, answers, teacher, return_state=True)

    first = curate_flow()
    assert first.name == "Completed"
    assert curate_flow().name == "Cached"  # the same prompt: Prefect's cache answers
    template.write_text("Score this answer from 1 to 10: {{ answer }}")
    edited = curate_flow()
    assert edited.name != "Cached", "the edited judge prompt came back from Prefect's cache with the old output"
    assert edited.result().key != first.result().key
    assert edited.result().manifest()["inputs"]["judge_template"].startswith("Score this answer")
