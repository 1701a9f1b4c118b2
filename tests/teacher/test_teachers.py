"""Several teachers routed by a row's column (issue 26, part 2): the recipe's checks, the routing rule, the teachers'
answers and logit caches joined by row (exactly), the report's figures per teacher, and on-policy steps scored by
routed teachers. Fast: no model is trained beyond one step of a tiny student."""

import random

import numpy as np
import pandas as pd
import pytest
import torch

from kdflow.config.loading import RecipeError
from kdflow.config.logit_cache import ValueEncoding
from kdflow.config.recipe import parse_recipe
from kdflow.config.teachers import Routing, RowMatch
from kdflow.logit_cache.ensemble import join_caches
from kdflow.logit_cache.format import CacheMismatch, TopK, cache_meta
from kdflow.logit_cache.reader import LogitCache
from kdflow.logit_cache.writer import capture_shards
from kdflow.reporting.teachers import routed_figures, teachers_markdown
from kdflow.teacher.routing import TEACHER_COLUMN, join_tables, token_shares
from kdflow.training.tiny_models import train_tokenizer
from tests.conftest import MINI_RECIPE

TEACHER = "{hidden: 64, layers: 1, heads: 2, intermediate: 128}"
TEACHERS = f"""teachers:
  - name: add
    architecture: {TEACHER}
    vocab_size: 48
    train_on: {{column: question, count: "-", values: ["0"]}}
    training: {{max_steps: 5}}
  - name: sub
    architecture: {TEACHER}
    vocab_size: 48
    training: {{max_steps: 5}}
routing:
  column: question
  count: "-"
  routes: {{"0": add}}
  default: sub
"""


def mini_text() -> str:
    return MINI_RECIPE.read_text()


def two_teachers(text: str | None = None, teachers: str = TEACHERS) -> str:
    """The miniature recipe with its ``teacher`` section replaced by ``teachers``."""
    text = text or mini_text()
    start = text.index("teacher:\n")
    end = text.index("generation:")
    return text[:start] + teachers + "\n" + text[end:]


def with_logit_student(text: str) -> str:
    return text.replace("evaluation:", "logit_cache: {k: 4}\n\nevaluation:", 1).replace(
        "  - name: seq-kd\n    data: teacher\n",
        "  - name: seq-kd\n    data: teacher\n    kd: {method: offline, divergence: forward_kl, alpha: 0.5}\n",
    )


def refused(text: str) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(text)
    return str(e.value)


# --- the recipe ---------------------------------------------------------------------------------------------------


def test_teachers_load_and_the_default_stands_for_the_teacher():
    r = parse_recipe(with_logit_student(two_teachers()))
    assert [t.name for t in r.teachers] == ["add", "sub"]
    assert r.routing.default == "sub" and r.teacher.architecture == r.teachers[1].architecture
    assert r.teachers[0].train_on == RowMatch(column="question", count="-", values=["0"])
    assert r.teachers[0].section().model_dump() == {
        **parse_recipe(mini_text()).teacher.model_dump(),
        "training": {"max_steps": 5},
    }


def test_one_teacher_recipes_have_no_teachers():
    r = parse_recipe(mini_text())
    assert r.teachers is None and r.routing is None


def test_an_unknown_teacher_in_a_route_is_refused_naming_it():
    text = two_teachers(teachers=TEACHERS.replace('{"0": add}', '{"0": adder}'))
    message = refused(text)
    assert "routing" in message and "'adder'" in message and "add" in message and "sub" in message


def test_a_default_that_is_no_teacher_is_refused():
    message = refused(two_teachers(teachers=TEACHERS.replace("default: sub", "default: mul")))
    assert ":27: routing.default: routing.default 'mul' is not a teacher's name" in message  # its line


def test_a_route_column_the_data_lacks_is_refused():
    message = refused(
        two_teachers(teachers=TEACHERS.replace("  column: question\n  count", "  column: topic\n  count"))
    )
    assert "routing" in message and "column 'topic'" in message and "question" in message


def test_train_on_a_column_the_data_lacks_is_refused():
    text = two_teachers(teachers=TEACHERS.replace("train_on: {column: question", "train_on: {column: level"))
    assert "train_on" in refused(text)


def test_a_bad_count_regex_is_refused():
    assert "is not a regex" in refused(two_teachers(teachers=TEACHERS.replace('count: "-"', 'count: "("')))


def test_teachers_of_different_tokenizers_are_refused_where_logits_are_needed():
    teachers = TEACHERS.replace(
        "    vocab_size: 48\n    training: {max_steps: 5}", "    vocab_size: 40\n    training: {max_steps: 5}"
    )
    message = refused(with_logit_student(two_teachers(teachers=teachers)))
    assert "teachers" in message and "'sub' tokenizes otherwise than 'add'" in message
    parse_recipe(two_teachers(teachers=teachers))  # sequence-level KD takes any teachers' text


def test_an_api_teacher_is_refused_where_logits_are_needed():
    api = TEACHERS.replace(
        f"  - name: sub\n    architecture: {TEACHER}\n    vocab_size: 48\n    training: {{max_steps: 5}}\n",
        "  - name: sub\n    api: true\n    generation: {backend: openai, api: {base_url: 'http://127.0.0.1:9/v1', "
        "model: m, api_key_env: null}}\n",
    )
    r = parse_recipe(two_teachers(teachers=api))  # text only: its answers are fine
    assert r.teachers[1].generation.api.model == "m" and r.generation.backend.value == "hf"
    assert r.teachers[1].generation.max_new_tokens == r.generation.max_new_tokens  # merged over the recipe's
    message = refused(with_logit_student(two_teachers(teachers=api)))
    assert "teachers" in message and "'sub' is an API model" in message


def test_teacher_and_teachers_together_are_refused():
    text = two_teachers()
    text = text.replace("teachers:", f"teacher:\n  architecture: {TEACHER}\n\nteachers:", 1)
    assert "teacher and teachers are both set" in refused(text)


def test_duplicate_names_are_refused():
    teachers = TEACHERS.replace("name: sub", "name: add").replace("default: sub", "default: add")
    assert "teachers.name must be unique; rename ['add']" in refused(two_teachers(teachers=teachers))


def with_kd(kd: str, teachers: str = TEACHERS) -> str:
    """The two-teacher miniature with its seq-kd student trained by ``kd``."""
    return with_logit_student(two_teachers(teachers=teachers)).replace(
        "kd: {method: offline, divergence: forward_kl, alpha: 0.5}", kd
    )


def test_on_policy_kd_with_routed_local_teachers_is_accepted():
    r = parse_recipe(with_kd("kd: {method: on_policy, k: 4, lmbda: 1.0}"))
    assert r.students[-1].kd.method.value == "on_policy" and [t.name for t in r.teachers] == ["add", "sub"]
    # its off-policy share reads the joined logit cache, as an offline student does
    assert parse_recipe(with_kd("kd: {method: on_policy, k: 4, lmbda: 0.5}")).students[-1].kd.lmbda == 0.5


def test_kd_loading_one_teacher_model_into_training_is_refused_with_several():
    online = "kd: {method: online, divergence: jsd}"
    message = refused(with_kd(online))
    assert "students.1.kd.method" in message and "kd method online loads one teacher model" in message
    assert "on_policy" in message  # the fix names the methods that work
    assert "kd method feature loads one teacher model" in refused(with_kd("kd: {method: feature, feature: {}}"))


def test_on_policy_kd_by_vllm_with_several_teachers_needs_each_teachers_server():
    """One kd.base_url cannot serve several teachers, and kdflow starts no server per teacher: each teacher's own is
    its ``served`` (tests/teacher/test_served_teachers.py)."""
    served = "kd: {method: on_policy, teacher_backend: vllm, base_url: 'http://127.0.0.1:9/v1'}"
    message = refused(with_kd(served))
    assert "students.1.kd.base_url" in message and "kd.base_url names one vLLM server" in message
    message = refused(with_kd("kd: {method: on_policy, teacher_backend: vllm}"))
    assert "teachers.0.served" in message and "teacher 'add' names no server" in message


def test_on_policy_kd_with_an_api_teacher_is_refused_naming_the_teacher():
    api = TEACHERS.replace(
        f"  - name: sub\n    architecture: {TEACHER}\n    vocab_size: 48\n    training: {{max_steps: 5}}\n",
        "  - name: sub\n    api: true\n    generation: {backend: openai, api: {base_url: 'http://127.0.0.1:9/v1', "
        "model: m, api_key_env: null}}\n",
    )
    on_policy = with_kd("kd: {method: on_policy, lmbda: 1.0}", api).replace("logit_cache: {k: 4}\n\n", "")
    message = refused(on_policy)
    assert "teachers.1.api" in message and "teacher 'sub' is an API model, whose logits are not here" in message


# --- routing -----------------------------------------------------------------------------------------------------


def test_routing_by_value_and_by_count():
    by_count = Routing(column="question", count="[+-]", routes={"2": "short", "3": "short"}, default="long")
    assert [by_count.teacher_of({"question": q}) for q in ("1+2", "1+2-3", "1+2-3+4", "1+2-3+4-5")] == [
        "long",
        "short",
        "short",
        "long",
    ]
    by_value = Routing(column="split", routes={"train": "a"}, default="b")
    assert by_value.teacher_of({"split": "train"}) == "a" and by_value.teacher_of({"split": "prompts"}) == "b"
    with pytest.raises(KeyError, match="routing reads column 'topic'"):
        Routing(column="topic", default="a").teacher_of({"id": "x", "question": "1+2"})


def test_joined_answers_keep_every_row_once_in_id_order_with_its_teacher(tmp_path):
    a = pd.DataFrame({"id": ["r2", "r0"], "sample": [0, 0], "text": ["two", "zero"]})
    b = pd.DataFrame({"id": ["r1", "r3"], "sample": [0, 0], "text": ["one", "three"]})
    a.to_parquet(tmp_path / "a.parquet")
    b.to_parquet(tmp_path / "b.parquet")
    joined = join_tables({"add": tmp_path / "a.parquet", "sub": tmp_path / "b.parquet", "none": tmp_path / "x"})
    assert joined["id"].tolist() == ["r0", "r1", "r2", "r3"]
    assert joined[TEACHER_COLUMN].tolist() == ["add", "sub", "add", "sub"]
    assert joined["text"].tolist() == ["zero", "one", "two", "three"]
    assert token_shares({"add": 30, "sub": 10}) == {"add": 0.75, "sub": 0.25}
    assert token_shares({"add": 0}) == {"add": 0.0}


# --- the logit caches, joined by row -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([f"{a}+{b}={a + b}" for a in range(10) for b in range(10)], 40)


def synthetic_cache(folder, tokenizer, row_ids, seed, encoding=ValueEncoding.u8, k=4):
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)

    def row(row_id: str) -> TopK:
        n = int(rng.integers(5, 12))
        start = int(rng.integers(1, n - 2))
        L = n - 1 - start
        logits = rng.normal(size=(L, vocab)) * 3
        lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ids = np.argsort(-lp, axis=-1)[:, :k]
        top = np.take_along_axis(lp, ids, -1)
        tail = np.log1p(-np.exp(top).sum(-1))
        return TopK(row_id, rng.integers(0, vocab, n), start, ids, top.astype(np.float32), tail.astype(np.float32))

    meta = cache_meta(
        teachers=[{"model": f"teacher-{seed}", "revision": None, "weight": 1.0}],
        tokenizer=tokenizer,
        vocab_size=vocab,
        k=k,
        temperature=1.0,
        encoding=encoding,
        source="hf",
    )
    rows = {r: row(r) for r in row_ids}
    capture_shards(folder, row_ids, 3, meta, lambda idx: [rows[row_ids[i]] for i in idx])
    return LogitCache.open(folder)


@pytest.mark.parametrize("encoding", [ValueEncoding.u8, ValueEncoding.fp16])
def test_joined_cache_holds_each_row_exactly_as_its_teachers_cache(tmp_path, tokenizer, encoding):
    ids = [f"r{i}/0" for i in range(12)]
    random.Random(0).shuffle(ids)
    add = synthetic_cache(tmp_path / "add", tokenizer, ids[:7], 1, encoding)
    sub = synthetic_cache(tmp_path / "sub", tokenizer, ids[7:], 2, encoding)
    join_caches({"add": add, "sub": sub}, tmp_path / "joined")
    joined = LogitCache.open(tmp_path / "joined", expect_tokenizer=tokenizer)
    joined.verify()
    assert sorted(joined.row_ids) == sorted(ids)
    for source in (add, sub):
        for row_id in source.row_ids:
            want, got = source[row_id], joined[row_id]
            assert got.start == want.start
            for field in ("input_ids", "positions", "ids", "logprobs", "tail"):
                assert np.array_equal(getattr(got, field).numpy(), getattr(want, field).numpy()), (row_id, field)
    m = joined.manifest
    assert (
        m["source"] == "routed"
        and m["rows"] == 12
        and m["positions"] == add.manifest["positions"] + sub.manifest["positions"]
    )
    by_name = {t["name"]: t for t in m["teachers"]}
    assert by_name["add"]["rows"] == 7 and by_name["sub"]["positions"] == sub.manifest["positions"]


def test_a_teacher_that_kept_no_row_joins_as_nothing(tmp_path, tokenizer):
    add = synthetic_cache(tmp_path / "add", tokenizer, ["a/0", "b/0"], 1)
    none = synthetic_cache(tmp_path / "none", tokenizer, [], 2)
    join_caches({"add": add, "none": none}, tmp_path / "joined")
    joined = LogitCache.open(tmp_path / "joined")
    assert joined.row_ids == ["a/0", "b/0"] and joined["b/0"].ids.equal(add["b/0"].ids)


def test_joining_caches_of_other_tokenizers_or_shared_rows_is_refused(tmp_path, tokenizer):
    add = synthetic_cache(tmp_path / "add", tokenizer, ["a/0", "b/0"], 1)
    other = train_tokenizer([f"{a}*{b}" for a in range(10) for b in range(10)], 36)
    sub = synthetic_cache(tmp_path / "sub", other, ["c/0"], 2)
    with pytest.raises(CacheMismatch, match="teacher 'sub'"):
        join_caches({"add": add, "sub": sub}, tmp_path / "j1")
    twice = synthetic_cache(tmp_path / "twice", tokenizer, ["b/0", "c/0"], 3)
    with pytest.raises(ValueError, match="row 'b/0' is in teacher 'add'"):
        join_caches({"add": add, "sub": twice}, tmp_path / "j2")


# --- the report --------------------------------------------------------------------------------------------------


def test_report_figures_per_teacher_and_for_the_routed_teachers():
    routing = Routing(column="question", count="-", routes={"0": "add"}, default="sub")
    test = [{"id": f"t{i}", "question": q} for i, q in enumerate(["1+2", "3-1", "4+4", "5-2+1"])]
    # add is right on its own rows (t0, t2) and wrong elsewhere; sub right on t1 only
    predictions = {
        "add": [{"id": f"t{i}", "correct": c} for i, c in enumerate([True, False, True, False])],
        "sub": [{"id": f"t{i}", "correct": c} for i, c in enumerate([False, True, False, False])],
    }
    answers = {"by_teacher": {"add": {"rows": 30}, "sub": {"rows": 10}}, "token_share": {"add": 0.6, "sub": 0.4}}
    logits = {"by_teacher": {"add": {"positions": 300}}, "token_share": {"add": 0.7, "sub": 0.3}}
    f = routed_figures(routing, test, predictions, answers, logits, {"add": 28, "sub": 9})
    assert f["routed_accuracy"] == 0.75  # t0 add ✓, t1 sub ✓, t2 add ✓, t3 sub ✗
    add, sub = f["by_teacher"]["add"], f["by_teacher"]["sub"]
    assert (add["test_rows"], add["accuracy_own_rows"], add["accuracy_other_rows"], add["accuracy_all_rows"]) == (
        2,
        1.0,
        0.0,
        0.5,
    )
    assert (sub["test_rows"], sub["accuracy_own_rows"], sub["accuracy_other_rows"]) == (2, 0.5, 0.0)
    assert (
        add["answers"] == 30
        and add["kept"] == 28
        and add["logit_token_share"] == 0.7
        and sub["logit_positions"] is None
    )
    md = teachers_markdown(f)
    assert (
        "## Teachers" in md
        and "**75.0 %**" in md
        and "| add | 2 | 100.0 % | 0.0 % | 30 | 28 | 60.0 % | 300 | 70.0 % |" in md
    )
    assert teachers_markdown(None) == ""


# --- on-policy scoring, routed -----------------------------------------------------------------------------------


class PartsScorer:
    """A scorer that answers in parts of two rows, tagging each answer with its name (a unit-test stand-in)."""

    def __init__(self, name: str):
        self.name, self.closed, self.seen = name, False, []

    def parts(self, rows):
        self.seen += [r.row_id for r in rows]
        for begin in range(0, len(rows), 2):
            chunk = list(range(begin, min(begin + 2, len(rows))))
            yield chunk, [TopK(f"{self.name}:{rows[i].row_id}", rows[i].input_ids, 0, None, None, None) for i in chunk]

    def close(self):
        self.closed = True


def test_routed_scorer_scores_each_row_by_its_teacher_under_the_callers_indices():
    from kdflow.logit_cache.scoring import RoutedScorer, TeacherScoringError
    from kdflow.logit_cache.topk import EncodedRow

    rows = [EncodedRow(f"r{i}", np.arange(3), 1) for i in range(5)]
    route = {"r0": "add", "r1": "sub", "r2": "add", "r3": "add", "r4": "sub"}
    scorers = {"add": PartsScorer("add"), "sub": PartsScorer("sub")}
    routed = RoutedScorer(scorers, lambda row: route[row.row_id])
    assert [t.row_id for t in routed.score(rows)] == [f"{route[f'r{i}']}:r{i}" for i in range(5)]
    assert scorers["add"].seen == ["r0", "r2", "r3"] and scorers["sub"].seen == ["r1", "r4"]
    routed.close()
    assert all(s.closed for s in scorers.values())
    with pytest.raises(TeacherScoringError, match="routed to teacher 'mul'"):
        RoutedScorer(scorers, lambda row: "mul").score(rows)


class InProcessTeacher:
    """A teacher scoring in this process (``hf_topk_parts``), recording the rows it is asked: a unit-test stand-in
    for a scoring process."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad, self.seen = model, pad_id, []

    def parts(self, rows):
        self.seen += [r.row_id for r in rows]
        from kdflow.logit_cache.topk import hf_topk_parts

        yield from hf_topk_parts(self.model, rows, 4, batch_tokens=120, pad_id=self.pad)  # several parts each


@pytest.mark.parametrize("overlap", [False, True])
def test_an_on_policy_step_has_each_sample_scored_by_the_teacher_of_its_row(tmp_path, overlap):
    """The trainer's samples carry their rows' ids, and a ``RoutedScorer`` sends each to its row's teacher: exactly
    the rows routed to a teacher reach it, and the accounting counts each teacher's samples and positions."""
    from datasets import Dataset

    from kdflow.config.kd import OnPolicyKD
    from kdflow.config.templates import chat
    from kdflow.config.training import trainer_config
    from kdflow.logit_cache.format import cache_row_id
    from kdflow.logit_cache.scoring import RoutedScorer
    from kdflow.training.on_policy import OnPolicyCollator, OnPolicyConfig, OnPolicyTrainer, prompt_rows
    from kdflow.training.on_policy_scoring import routed_rows
    from kdflow.training.tiny_models import llama_model
    from tests.logit_cache.test_capture import kept_rows, tiny_teacher

    add, tok = tiny_teacher(tmp_path / "add", seed=0, sharpen=20.0)
    sub, _ = tiny_teacher(tmp_path / "sub", seed=1, sharpen=20.0)  # the same tokenizer, other weights
    rows = [
        {"row_id": cache_row_id(r), **chat(f"Solve step by step: {r['question']}", r["text"]), TEACHER_COLUMN: name}
        for r, name in zip(kept_rows(8), ["add", "sub", "sub", "add", "add", "sub", "add", "add"])
    ]
    routes = routed_rows(rows, {"add": str(tmp_path / "add"), "sub": str(tmp_path / "sub")})
    teachers = {"add": InProcessTeacher(add, tok.pad_token_id), "sub": InProcessTeacher(sub, tok.pad_token_id)}
    settings = OnPolicyKD(method="on_policy", k=4, max_new_tokens=8, overlap=overlap).model_dump(exclude={"method"})
    training = {"max_steps": 1, "per_device_train_batch_size": 8, "max_length": 64}
    config = trainer_config(
        training, tmp_path / "out", 0, None, OnPolicyConfig, teacher=str(tmp_path / "add"), **settings
    )
    data = prompt_rows(tok, rows, training["max_length"])
    model = llama_model(tok, hidden=32, layers=1, heads=1, intermediate=64, seed=0)
    trainer = OnPolicyTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(data),
        processing_class=tok,
        data_collator=OnPolicyCollator(tok.pad_token_id),
        scorer=RoutedScorer(teachers, lambda row: routes[row.row_id]),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        routes=routes,
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test does not run
    loss = trainer.training_step(model, OnPolicyCollator(tok.pad_token_id)(data))
    batches = 1
    if overlap:  # the first step fills the pipeline: its prompts sampled again and handed to the teachers
        trainer._pending[1].result()
        trainer._teacher.shutdown()
        batches = 2
    assert torch.isfinite(loss) and loss > 0
    mine = {name: [r["row_id"] for r in rows if r[TEACHER_COLUMN] == name] for name in teachers}
    assert mine["add"] and mine["sub"]
    for name, teacher in teachers.items():
        assert teacher.seen == mine[name] * batches, name
    a = trainer.accounting
    assert {name: n["samples"] for name, n in a.by_teacher.items()} == {"add": 5 * batches, "sub": 3 * batches}
    assert sum(n["tokens"] for n in a.by_teacher.values()) == a.teacher_tokens_scored == a.student_tokens_sampled


def test_an_on_policy_students_key_holds_its_teachers_and_routing_and_no_other_students_key_moves():
    from kdflow.store.outputs import OutputRef
    from kdflow.teacher.routing import RoutedTeachers
    from tasks.students import STUDENTS

    r = parse_recipe(with_kd("kd: {method: on_policy, k: 4}"))
    ref = lambda name: OutputRef(stage="teacher", key=name, path=f"/nowhere/{name}", sha256=name * 8)  # noqa: E731
    args = {"section": r.students[-1], "template": "t", "teacher": ref("b"), "data": ref("d"), "curated": ref("c")}
    routed = RoutedTeachers(routing=r.routing, teachers={"add": ref("a"), "sub": ref("b")})
    key = STUDENTS.key(**args, routed=routed)
    assert STUDENTS.key(**args) == STUDENTS.key(**args, routed=None) != key  # one teacher: the key it always had
    other = r.routing.model_copy(update={"routes": {"1": "add"}})
    assert STUDENTS.key(**args, routed=routed.model_copy(update={"routing": other})) != key  # new routing: retrains
    moved = routed.model_copy(update={"teachers": {"add": ref("a2"), "sub": ref("b")}})
    assert STUDENTS.key(**args, routed=moved) != key  # a retrained teacher: retrains
    assert STUDENTS.key(**args, routed=routed.model_copy(update={"teachers": {
        name: t.model_copy(update={"path": "/elsewhere"}) for name, t in routed.teachers.items()}})) == key  # fmt: skip


def test_joined_answers_stage_counts_no_teacher_request_twice_in_the_ledger(tmp_path):
    from kdflow.reporting.ledger import figures
    from kdflow.store.outputs import building, existing_output, finish
    from kdflow.teacher.generation import ANSWERS, FAILURES
    from tasks.generate import join_answers

    parts = {}
    for name, ids in (("add", ["r0", "r2"]), ("sub", ["r1"])):
        with building(tmp_path, "generate", name) as tmp:
            pd.DataFrame({"id": ids, "sample": 0, "text": ids, "completion_tokens": 5}).to_parquet(tmp / ANSWERS)
            pd.DataFrame({"id": []}).to_parquet(tmp / FAILURES)
            acct = {"requests": len(ids), "prompt_tokens": 7, "completion_tokens": 5 * len(ids), "seconds": 2.0}
            finish(tmp, "generate", name, inputs={}, rows=len(ids), failed=0, backend="openai", accounting=acct,
                   completion_tokens=5 * len(ids))  # fmt: skip
        parts[name] = existing_output(tmp_path, "generate", name)
    joined = join_answers.fn(tmp_path, parts).manifest()
    assert joined["rows"] == 3 and joined["completion_tokens"] == 15
    assert joined["token_share"] == {"add": 0.6667, "sub": 0.3333}
    assert joined["parts_accounting"]["requests"] == 3 and "accounting" not in joined
    # each part's own figures are the ledger's; the join counts only its own wall time, not the parts' requests
    assert figures(joined).device_s == joined["wall_seconds"] and not figures(joined).api
