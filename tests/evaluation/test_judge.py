"""The LLM-judge stage (tasks/evaluate.py judge_students): win rate of each student against the teacher's
answers. Offline with a scripted judge behind a real HTTP server and the real openai client (win/tie/loss
arithmetic, position bias cancelling, unparsable replies and failed requests counted apart, replies kept
across a failed run); the recipe section's validation; the evaluate flow and its report with a judge; and a
tiny model behind the real vLLM server as the judge (its replies are garbage: every one must be accounted for)."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kdflow.config.evaluation import EvaluationSection
from kdflow.config.loading import RecipeError
from kdflow.config.recipe import parse_recipe
from kdflow.evaluation.judge import TooManyJudgeFailures
from kdflow.store.outputs import building, existing_output, finish
from tasks.evaluate import judge_students, reply_folder
from tests.conftest import ROOT, VLLM_TEST_API_KEY
from tests.fault_proxy import FakeTeacher, FaultProxy

QUESTIONS = [
    {"id": f"q{i}", "question": f"question {i}", "answer": str(i), "rationale": f"Answer: {i}"} for i in range(4)
]
# What each model answered (its evaluate-stage predictions): a judge that reads the answers prefers RIGHT.
TEACHER = ["RIGHT", "RIGHT", "WRONG", "RIGHT"]
GOOD = ["RIGHT", "RIGHT", "RIGHT", "RIGHT"]  # ties q0, q1, q3; beats the teacher on q2
BAD = ["WRONG", "WRONG", "WRONG", "WRONG"]  # loses q0, q1, q3; ties q2
ANSWERS = re.compile(r"Answer A:\n(.*?)\n\nAnswer B:\n(.*?)\n\n", re.S)


def stage(run_dir: Path, name: str, key: str, tables: dict[str, list[dict]] | None = None, **manifest):
    key = key.ljust(64, "0")
    with building(run_dir, name, key) as tmp:
        for file, rows in (tables or {}).items():
            pd.DataFrame(rows).to_parquet(tmp / file, index=False)
        finish(tmp, name, key, inputs={}, **manifest)
    return existing_output(run_dir, name, key)


def evaluated(run_dir: Path, name: str, texts: list[str]):
    predictions = [
        {"id": q["id"], "answer": q["answer"], "text": t, "finish_reason": "stop", "correct": t == "RIGHT"}
        for q, t in zip(QUESTIONS, texts)
    ]
    return stage(run_dir, "evaluate", f"e{name}", {"predictions.parquet": predictions})


@pytest.fixture
def run(tmp_path):
    run_dir = tmp_path / "run"
    data = stage(run_dir, "data", "d", {"test.parquet": QUESTIONS})
    students = {"good": evaluated(run_dir, "good", GOOD), "bad": evaluated(run_dir, "bad", BAD)}
    return run_dir, data, students, evaluated(run_dir, "teacher", TEACHER)


def by_content(prompt: str) -> str:
    a, b = ANSWERS.search(prompt).groups()
    return "Verdict: tie" if a == b else "Both read. Verdict: A" if a == "RIGHT" else "Verdict: **B**"


def judge(url: str, **kw) -> EvaluationSection.Judge:
    return EvaluationSection.Judge(base_url=url + "/v1", model="fake-judge", api_key_env=None, **kw)


def judged(run, url: str, **kw):
    run_dir, data, students, teacher = run
    ref = judge_students.fn(run_dir, judge(url, **kw), students, teacher, data, "test")
    return ref, json.loads((Path(ref.path) / "win_rates.json").read_text())


def test_a_judge_that_reads_the_answers_scores_win_tie_loss(run):
    with FakeTeacher(reply=by_content) as fake:
        ref, rates = judged(run, fake.url)
    # good: q2 won in both orders (2 wins), q0, q1, q3 tied (6 ties): (2 + 6 × ½) / 8
    assert rates["good"] == {
        "win_rate": pytest.approx(5 / 8),
        "judged": 8,
        "wins": 2,
        "ties": 6,
        "losses": 0,
        "unparsed": 0,
        "failed": 0,
        "pairs_parsed": 4,
        "consistent_pairs": 4,
    }
    # bad: q0, q1, q3 lost (6 losses), q2 tied: 2 × ½ / 8
    assert rates["bad"]["win_rate"] == pytest.approx(1 / 8) and (rates["bad"]["losses"], rates["bad"]["ties"]) == (6, 2)
    m = ref.manifest()
    assert m["win_rates"] == rates and m["questions"] == 4 and m["rows"] == 16
    assert m["judge"] == {
        "backend": "openai",
        "model": "fake-judge",
        "base_url": fake.url + "/v1",
        "template": "prompts/judge.jinja",
    }
    table = pd.read_parquet(Path(ref.path) / "judgements.parquet")
    assert len(table) == 16 and list(table["student_is"][:2]) == ["A", "B"]
    row = table[(table["student"] == "good") & (table["id"] == "q2") & (table["student_is"] == "B")].iloc[0]
    assert "Answer A:\nWRONG\n\nAnswer B:\nRIGHT" in row["prompt"] and row["verdict"] == "B" and row["outcome"] == "win"


def test_position_bias_cancels_and_unparsable_replies_are_counted_apart(run, tmp_path):
    # Always "A": the student wins when placed first, loses when placed second, whatever it answered.
    with FakeTeacher(reply=lambda prompt: "Verdict: A") as fake:
        _, rates = judged(run, fake.url)
    for r in rates.values():
        assert r["win_rate"] == 0.5 and (r["wins"], r["losses"], r["ties"]) == (4, 4, 0)
        assert r["consistent_pairs"] == 0  # a judge of places, not answers: never the same outcome twice
    # Reads the answers, but gives no verdict line about question 3: those two replies are not scored.
    garbled = lambda prompt: "I cannot tell." if "question 3" in prompt else by_content(prompt)
    with FakeTeacher(reply=garbled) as fake:
        ref, rates = judged(run, fake.url)
    assert rates["good"] == {
        "win_rate": pytest.approx(4 / 6),
        "judged": 6,
        "wins": 2,
        "ties": 4,
        "losses": 0,
        "unparsed": 2,
        "failed": 0,
        "pairs_parsed": 3,
        "consistent_pairs": 3,
    }
    table = pd.read_parquet(Path(ref.path) / "judgements.parquet")
    unparsed = table[table["outcome"].isna()]
    assert len(unparsed) == 4 and set(unparsed["reason"]) == {"unparsed_verdict"}
    assert set(unparsed["text"]) == {"I cannot tell."}  # the raw reply stays, never a placeholder


def test_max_questions_takes_the_first_questions(run):
    with FakeTeacher(reply=by_content) as fake:
        ref, rates = judged(run, fake.url, max_questions=2)
    assert ref.manifest()["questions"] == 2
    assert rates["good"]["ties"] == 4 and rates["good"]["win_rate"] == 0.5 and rates["bad"]["losses"] == 4


def test_failed_requests_fail_the_stage_and_a_rerun_asks_only_for_them(run, monkeypatch):
    monkeypatch.setattr("kdflow.teacher.api_client.BACKOFF_BASE_S", 0.001)
    with FakeTeacher(reply=by_content) as fake, FaultProxy(fake.url, rate=0.3, faults=("500",), seed=1) as proxy:
        with pytest.raises(TooManyJudgeFailures, match=r"judge requests failed for good .*'server_error'"):
            judged(run, proxy.url, max_retries=0, max_failure_fraction=0.0)
        failed = proxy.faults["500"]
        assert 0 < failed < 12  # 12 distinct prompts: a pair of equal answers reads the same in both orders
        assert not list((run[0] / "judge").glob("[!.]*"))  # no output, only the replies received so far
        asked = sum(proxy.bodies.values())
        proxy.rate = 0.0
        ref, rates = judged(run, proxy.url, max_retries=0, max_failure_fraction=0.0)
        assert sum(proxy.bodies.values()) - asked == failed  # only the failed prompts asked again
    assert ref.manifest()["accounting"]["resumed"] == 12 - failed
    assert rates["good"]["win_rate"] == pytest.approx(5 / 8) and rates["bad"]["win_rate"] == pytest.approx(1 / 8)


def test_failed_requests_within_the_allowance_are_counted_apart(run, monkeypatch):
    monkeypatch.setattr("kdflow.teacher.api_client.BACKOFF_BASE_S", 0.001)
    with FakeTeacher(reply=by_content) as fake, FaultProxy(fake.url, rate=0.3, faults=("500",), seed=1) as proxy:
        ref, rates = judged(run, proxy.url, max_retries=0, max_failure_fraction=1.0)
    table = pd.read_parquet(Path(ref.path) / "judgements.parquet")
    failed = table[table["text"].isna()]
    assert len(failed) >= proxy.faults["500"] > 0 and set(failed["reason"]) == {"server_error"}
    assert failed["error"].str.contains("server error \\(injected\\)").all()
    for name, r in rates.items():
        assert r["failed"] == len(failed[failed["student"] == name])
        assert r["judged"] + r["unparsed"] + r["failed"] == 8 and r["wins"] + r["ties"] + r["losses"] == r["judged"]


def test_the_stage_is_cached_by_content(run):
    from tasks.evaluate import JUDGE

    run_dir, data, students, teacher = run
    with FakeTeacher(reply=by_content) as fake:
        first, _ = judged(run, fake.url)
        assert judged(run, fake.url, concurrency=3, timeout_s=9, max_retries=1)[0] == first  # throughput knobs

    def key(section, **inputs):
        return JUDGE.key(
            **{"section": section, "students": students, "teacher": teacher, "data": data, "split": "test", **inputs}
        )

    changed = [judge(fake.url, max_questions=3), judge(fake.url, max_new_tokens=9), judge(fake.url + "/other")]
    assert (
        len({key(judge(fake.url)), *map(key, changed), key(judge(fake.url), students={"good": students["good"]})}) == 5
    )


def test_a_local_judge_is_served_by_the_stage_under_its_path(run, monkeypatch, tmp_path):
    """backend vllm: the stage starts a server for the judge's folder (here a stand-in for vllm_server, the real
    one is tested with the teacher) and asks for the model by that path; stopped when the stage ends."""
    import contextlib

    from tests.conftest import build_tiny_teacher

    folder = build_tiny_teacher(tmp_path / "judge-model")
    served = []
    with FakeTeacher(reply=by_content) as fake:

        @contextlib.contextmanager
        def fake_server(model_dir, **kw):
            served.append((str(model_dir), kw))
            yield fake.url + "/v1"

        monkeypatch.setattr("kdflow.teacher.completion.vllm_server", fake_server)
        section = EvaluationSection.Judge(
            backend="vllm", model=str(folder), vllm={"extra_args": ["--dtype", "float32"]}
        )
        run_dir, data, students, teacher = run
        ref = judge_students.fn(run_dir, section, students, teacher, data, "test")
    assert [(m, kw["extra_args"]) for m, kw in served] == [(str(folder), ["--dtype", "float32"])]
    assert ref.manifest()["win_rates"]["good"]["win_rate"] == pytest.approx(5 / 8)
    judge_students.fn(run_dir, section, students, teacher, data, "test")
    assert len(served) == 1  # done: no server started again


def test_an_hf_judge_runs_in_process(run, tmp_path):
    from tests.conftest import build_tiny_teacher

    folder = build_tiny_teacher(tmp_path / "judge-model")
    run_dir, data, students, teacher = run
    section = EvaluationSection.Judge(backend="hf", model=str(folder), max_new_tokens=6, batch_size=4)
    ref = judge_students.fn(run_dir, section, students, teacher, data, "test")
    m = ref.manifest()
    assert m["accounting"]["answers"] == 12 and m["judge"]["backend"] == "hf"
    for r in m["win_rates"].values():  # an untrained model: garbage, every reply accounted for
        assert r["judged"] + r["unparsed"] == 8 and r["failed"] == 0


# ---- the recipe section -----------------------------------------------------------------------------


def mini(**evaluation) -> dict:
    """tests/mini.yaml as a dict, with more ``evaluation`` settings."""
    recipe = yaml.safe_load((ROOT / "tests" / "mini.yaml").read_text())
    recipe["evaluation"] |= evaluation
    return recipe


def recipe_with(judge_yaml: str) -> str:
    return yaml.safe_dump(mini(judge=yaml.safe_load(judge_yaml)), sort_keys=False)


def test_recipe_judge_section_validates_with_the_field_named():
    r = parse_recipe(recipe_with("base_url: http://127.0.0.1:8000/v1\nmodel: gpt-judge\nmax_questions: 50"))
    assert r.evaluation.judge.max_questions == 50 and r.evaluation.judge.template == "prompts/judge.jinja"
    assert parse_recipe((ROOT / "tests" / "mini.yaml").read_text()).evaluation.judge is None
    cases = {
        "base_url: http://x/v1\nmodel: m\ntemplate: prompts/nope.jinja": r"evaluation\.judge\.template: no template at .*prompts/nope\.jinja \(.*\): point it at a file under prompts/",  # noqa: E501
        "model: m": r"evaluation\.judge: backend 'openai' needs base_url",
        "backend: hf\nmodel: no-such-folder": r"evaluation\.judge: model 'no-such-folder' is neither a local folder",
        "backend: vllm\nmodel: org/judge\nbase_url: http://x/v1": r"evaluation\.judge: base_url is for backend 'openai'",  # noqa: E501
        "base_url: http://x/v1\nmodel: m\nmax_questions: 0": r"evaluation\.judge\.max_questions: Input should be greater",  # noqa: E501
        "base_url: http://x/v1\nmodel: m\nconcurency: 4": r"evaluation\.judge\.concurency: unknown field",
    }
    for body, message in cases.items():
        with pytest.raises(RecipeError, match=message):
            parse_recipe(recipe_with(body))


def test_a_judge_leaves_the_evaluate_stage_key_alone():
    from kdflow.store.outputs import canonical

    plain = EvaluationSection()
    with_judge = EvaluationSection(judge={"base_url": "http://x/v1", "model": "m"})
    assert canonical(plain) == canonical(with_judge)


# ---- the evaluate flow and its report, with a judge ---------------------------------------------------


@pytest.mark.slow
def test_evaluate_flow_with_a_judge_reports_its_win_rate(prefect_server, tmp_path):
    """flows/evaluate.py on a run folder of tiny models: the judge stage runs only with evaluation.judge, and
    report.md / report.json / the table artifact carry its column; without a judge, the report says so."""
    from flows.evaluate import evaluate
    from kdflow.store import run_folder
    from kdflow.store.model_folders import write_location
    from kdflow.training.tiny_models import llama_model, train_tokenizer
    from tasks.curate import CURATE
    from tasks.data import make_data
    from tasks.generate import GENERATE
    from tasks.students import STUDENTS
    from tasks.teacher import TEACHER

    recipe = mini(deployment={"latency_tokens": 4, "throughput_batch": 2, "repeats": 1})
    recipe["run"]["root"], recipe["data"]["splits"] = str(tmp_path / "runs"), {"train": 4, "prompts": 4, "test": 6}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(recipe))
    r = parse_recipe(yaml.safe_dump(recipe))
    run_dir = r.run_dir
    make_data.fn(run_dir, r.data)
    tokenizer = train_tokenizer(["Solve step by step: 1+2-3=0 Answer: 0123456789"] * 10, vocab_size=48)

    def model_stage(stage_name: str, key: str, seed: int, **manifest):
        def build(tmp):
            llama_model(tokenizer, hidden=64, layers=1, heads=2, intermediate=64, seed=seed).save_pretrained(
                tmp / "model"
            )
            tokenizer.save_pretrained(tmp / "model")
            write_location(tmp, "model")

        key = key.ljust(64, "0")
        with building(run_dir, stage_name, key) as tmp:
            build(tmp)
            finish(tmp, stage_name, key, inputs={}, **manifest)

    # Each output under the key the recipe gives it: the evaluate flow looks them up by key (flows/lookups.py found).
    data, cot = run_folder.latest(run_dir, "data"), r.prompts.cot_text()
    model_stage("teacher", TEACHER.key(section=r.teacher, data=data, template=cot), 0)
    teacher = run_folder.latest(run_dir, "teacher")
    answers = stage(run_dir, "generate", GENERATE.key(section=r.generation, template=cot, teacher=teacher, data=data))
    curated = stage(
        run_dir,
        "curate",
        CURATE.key(section=r.filters, source=r.data.source, answers=answers, teacher=teacher),
        {"kept.parquet": [{"id": f"q{i}"} for i in range(8)], "dropped.parquet": []},
        input_rows=8,
        kept=8,
        dropped=0,
        drop_reasons={},
    )
    for seed, s in enumerate(r.students, 1):
        keyed = dict(
            section=s, template=cot, teacher=teacher, data=data, curated=curated if s.data.value != "gold" else None
        )
        model_stage("students", STUDENTS.key(**keyed), seed, name=s.name)

    plain = evaluate(str(tmp_path / "plain.yaml"))
    assert plain["judge"]["status"] == "not run" and "judge_win_rate" not in plain["students"]["seq-kd"]
    assert "judge win rate vs teacher" not in (run_dir / "report.md").read_text().split("## How")[0]
    assert "**Judge win rate vs teacher**: not run" in (run_dir / "report.md").read_text()
    assert not (run_dir / "judge").exists()

    with FakeTeacher(reply=lambda prompt: "Verdict: tie") as fake:
        recipe["evaluation"]["judge"] = {"base_url": fake.url + "/v1", "model": "fake", "api_key_env": None}
        (tmp_path / "judged.yaml").write_text(yaml.safe_dump(recipe))
        report = evaluate(str(tmp_path / "judged.yaml"))
    assert report["judge"]["status"] == "done" and report["judge"]["questions"] == 6
    for name in ("baseline", "seq-kd"):
        assert report["students"][name]["judge_win_rate"] == 0.5 and report["students"][name]["judge"]["ties"] == 12
    md = (run_dir / "report.md").read_text()
    assert (
        "| model | trained on | accuracy | gap closed | perplexity | top-1 agreement | KL(teacher ‖ model) "
        "| judge win rate vs teacher |"
    ) in md
    assert re.search(r"\| teacher \| gold \|.*\| \(reference\) \|", md) and re.search(
        r"\| seq-kd \| teacher \|.*\| 0\.500 \|", md
    )
    assert "    - seq-kd: 0 wins, 12 ties, 0 losses; 0 replies without a verdict, 0 requests failed" in md
    assert json.loads((run_dir / "report.json").read_text())["students"]["baseline"]["judge_win_rate"] == 0.5


# ---- the real vLLM server as the judge --------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_model_judge_on_the_real_vllm_server(vllm_server_url, vllm_model_dir, run, monkeypatch):
    """A 1-layer untrained Llama answers the judge prompt with garbage: the stage still completes, and every
    judgement is a parsed verdict or an unparsable reply (none failed), the counts adding up."""
    monkeypatch.setenv("KDFLOW_TEST_JUDGE_KEY", VLLM_TEST_API_KEY)
    run_dir, data, students, teacher = run
    section = EvaluationSection.Judge(
        base_url=vllm_server_url,
        model=str(vllm_model_dir),
        max_new_tokens=16,
        api_key_env="KDFLOW_TEST_JUDGE_KEY",
        concurrency=4,
        timeout_s=60,
    )
    ref = judge_students.fn(run_dir, section, students, teacher, data, "test")
    rates = ref.manifest()["win_rates"]
    table = pd.read_parquet(Path(ref.path) / "judgements.parquet")
    acct = ref.manifest()["accounting"]
    assert acct["answers"] == table["prompt"].nunique() == 12 and acct["failures"] == 0
    assert len(table) == 16 and table["text"].notna().all()
    assert set(table["reason"].dropna()) <= {"unparsed_verdict"}
    assert (table["outcome"].notna() == table["reason"].isna()).all()  # parsed, or unparsable: never neither
    for name, r in rates.items():
        assert r["failed"] == 0 and r["judged"] + r["unparsed"] == 8
        assert r["wins"] + r["ties"] + r["losses"] == r["judged"]
        assert r["win_rate"] is None if r["judged"] == 0 else 0.0 <= r["win_rate"] <= 1.0
        assert r["unparsed"] == int(table[(table["student"] == name)]["outcome"].isna().sum())
    for path in run_dir.rglob("*"):  # the key is in no file the stage wrote
        assert not path.is_file() or VLLM_TEST_API_KEY.encode() not in path.read_bytes(), path


def test_a_password_in_the_judge_url_and_its_key_stay_out_of_the_run_folder(run, monkeypatch):
    from tasks.evaluate import JUDGE

    password = "pw-judge-SENTINEL-0c41"
    monkeypatch.setenv("KDFLOW_TEST_JUDGE_KEY", VLLM_TEST_API_KEY)
    run_dir, data, students, teacher = run
    with FakeTeacher(reply=by_content) as fake:
        url = fake.url.replace("http://", f"http://kd:{password}@")
        section = EvaluationSection.Judge(base_url=url + "/v1", model="fake-judge", api_key_env="KDFLOW_TEST_JUDGE_KEY")
        ref = judge_students.fn(run_dir, section, students, teacher, data, "test")
    assert ref.manifest()["win_rates"]["good"]["win_rate"] == pytest.approx(5 / 8)
    assert ref.manifest()["judge"]["base_url"] == fake.url.replace("http://", "http://***@") + "/v1"
    leaks = [
        p
        for p in Path(run_dir).rglob("*")
        if p.is_file() and (password.encode() in p.read_bytes() or VLLM_TEST_API_KEY.encode() in p.read_bytes())
    ]
    assert leaks == []  # manifests, judgements, and the hidden reply shards alike
    key = lambda u: JUDGE.key(section=judge(u), students=students, teacher=teacher, data=data, split="test")
    assert key(url) == key(url.replace(password, "another"))  # a new password is not a new judge
    assert reply_folder(run_dir, judge(url)) == reply_folder(run_dir, judge(url.replace(password, "another")))
