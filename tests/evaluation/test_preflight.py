"""The teacher preflight (issue 26, part 3): each check passes and fails on what it is shown (fakes), the plan asks
only what the recipe relies on, the probes ask a real tiny HF teacher and the real vLLM server, and a failed check
stops the distill flow before the teacher's answers (real Prefect)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdflow.config.generation import GenerationSection
from kdflow.config.logit_cache import LogitCacheSection
from kdflow.config.student import StudentSection
from kdflow.evaluation import preflight as pf
from kdflow.evaluation.preflight_probes import (
    NO_PREFIX_CACHING,
    Plan,
    Server,
    ServerRefused,
    StudentTokenizer,
    TeacherProbes,
    make_plan,
    prefix_caching_in,
    run_checks,
)
from tests.conftest import TINY_TEACHER_CORPUS, build_tiny_teacher

torch.set_num_threads(1)
MESSAGES = [{"role": "user", "content": "Solve step by step: 7+8-5"}]
GOLD = "7+8=15-5\n15-5=10\nAnswer: 10"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return build_tiny_teacher(tmp_path_factory.mktemp("preflight-teacher"))


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory) -> Path:
    """A model folder whose tokenizer is not the teacher's (another corpus, another vocabulary)."""
    from kdflow.training.tiny_models import llama_model, train_tokenizer

    folder = tmp_path_factory.mktemp("other-student")
    tokenizer = train_tokenizer(["an unrelated corpus of words, not sums"] * 20 + TINY_TEACHER_CORPUS, vocab_size=80)
    llama_model(tokenizer, hidden=64, layers=1, heads=2, intermediate=128, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- each check on what it is shown -------------------------------------------------------------------------------


def test_repeatable_passes_identical_fails_differing_greedy_and_states_a_sampling_spread():
    assert pf.repeatable("generation: hf", ["a", "a", "a"], True).status == pf.PASSED
    failed = pf.repeatable("generation: vllm", ["Answer: 10", "Answer: 11", "Answer: 10"], True)
    assert failed.status == pf.FAILED and failed.figures == {"requests": 3, "distinct": 2}
    assert "first difference at char 9" in failed.detail and "deterministically" in failed.fix
    spread = pf.repeatable("generation: openai", ["x", "y", "z"], False, "sampling at temperature 0.7")
    assert spread.status == pf.PASSED and spread.detail.startswith("spread: 3 distinct answers of 3 (sampling")


def topk(rows: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([[i for i, _ in r] for r in rows]), np.array([[v for _, v in r] for r in rows], dtype=np.float32)


def test_backends_agree_within_tolerance_and_fail_beyond_it():
    hf = topk([[(5, -0.1), (7, -2.5), (9, -4.0)], [(3, -0.2), (5, -1.9), (1, -3.3)]])
    close = topk([[(5, -0.1002), (7, -2.5004), (9, -4.0)], [(3, -0.2), (5, -1.9), (1, -3.3001)]])
    ok = pf.backends_agree("HF vs vllm", hf, close, 1e-3)
    assert ok.status == pf.PASSED and ok.figures["positions"] == 2 and ok.figures["top1_agreement"] == 1.0
    assert ok.figures["max_abs_logprob_diff"] == pytest.approx(4e-4, abs=1e-6)
    far = topk([[(5, -0.1), (7, -2.45), (9, -4.0)], [(3, -0.2), (5, -1.9), (1, -3.3)]])
    bad = pf.backends_agree("HF vs vllm", hf, far, 1e-3)
    assert bad.status == pf.FAILED and "position 0, token id 7" in bad.detail and "--dtype" in bad.fix
    # A near tie at the k-th place may fall either way: another id there, at the same log-prob, is agreement.
    tie = topk([[(5, -0.1), (7, -2.5), (8, -4.0)], [(3, -0.2), (5, -1.9), (1, -3.3)]])
    assert pf.backends_agree("HF vs vllm", hf, tie, 1e-3).status == pf.PASSED
    assert pf.backends_agree("x", hf, topk([[(5, -0.1)]]), 1e-3).status == pf.FAILED  # not the same sequence


def test_tokenizers_fail_only_where_white_box_kd_needs_them_to_match():
    differences = ["vocabularies differ (teacher 64 tokens, student 80; ...)"]
    seq = pf.tokenizers_match("seq-kd", False, differences)
    assert seq.status == pf.PASSED and "seq-KD" in seq.detail and "need not match" in seq.detail
    logit = pf.tokenizers_match("logit-fkl", True, differences)
    assert logit.status == pf.FAILED and "vocabularies differ" in logit.detail and "cross_tokenizer: gold" in logit.fix
    assert pf.tokenizers_match("gold", True, differences, gold=True).status == pf.PASSED
    assert pf.tokenizers_match("logit-fkl", True, []).status == pf.PASSED
    assert "BOS" in pf.rendered_difference([1, 4, 5], [4, 5])
    assert pf.rendered_difference([1, 4, 5], [1, 4, 5]) is None


def test_max_logprobs_and_prefix_caching():
    assert pf.enough_logprobs("logit cache", 20, 20).status == pf.PASSED
    fewer = pf.enough_logprobs("logit cache", 20, 5)
    assert fewer.status == pf.FAILED and "got only 5" in fewer.detail and "--max-logprobs 20" in fewer.fix
    refused = pf.enough_logprobs("logit cache", 25, None, "greater than max allowed: 20")
    assert refused.status == pf.FAILED and "refused: greater than max allowed: 20" in refused.detail
    on = pf.prefix_caching("logit cache", True, "its /metrics")
    assert on.status == pf.FAILED and NO_PREFIX_CACHING in on.fix
    assert pf.prefix_caching("logit cache", False, "flags").status == pf.PASSED
    assert pf.prefix_caching("logit cache", None, "no metrics").status == pf.SKIPPED
    info = 'vllm:cache_config_info{block_size="128",enable_prefix_caching="%s",engine="0"} 1.0'
    assert prefix_caching_in("# HELP ...\n" + info % "True") is True
    assert prefix_caching_in(info % "False") is False and prefix_caching_in("vllm:other 1.0") is None


def test_a_failure_names_each_failed_check_its_cause_and_fix_and_the_report_lists_all():
    found = [
        pf.repeatable("generation: hf", ["a"] * 3, True),
        pf.enough_logprobs("logit cache", 25, None, "greater than max allowed: 20"),
        pf.skipped("backends_agree", "the teacher runs on HF alone"),
    ]
    with pytest.raises(pf.PreflightFailed) as info:
        pf.raise_on_failure(found)
    message = str(info.value)
    assert "1 of 3 checks failed" in message and "max_logprobs[logit cache]" in message and "Fix: start" in message
    report = pf.report(found)
    assert report["passed"] is False and report["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert [c["status"] for c in report["checks"]] == ["passed", "failed", "skipped"]
    md = pf.markdown(found)
    assert "FAILED" in md and md.index("max_logprobs") < md.index("repeatable")  # failures first


# --- the plan: each check only where the recipe needs it ----------------------------------------------------------


class FakeProbes:
    """Answers as told; records what it was asked."""

    def __init__(self, answers=("a", "a", "a"), refuse=None, caching=False, differences=()):
        self.answers, self.refuse, self.caching, self.differences = list(answers), refuse, caching, list(differences)
        self.asked: list[str] = []

    @staticmethod
    def scores(k: int) -> tuple[np.ndarray, np.ndarray]:
        return topk([[(i, -0.1 - i) for i in range(k)]] * 4)

    def hf_answers(self, plan, n):
        self.asked.append("hf_answers")
        return self.answers[:n]

    def server_answers(self, plan, server, n):
        self.asked.append(f"server_answers {server.role}")
        return self.answers[:n]

    def hf_topk(self, plan, completion, k):
        self.asked.append("hf_topk")
        return self.scores(k)

    def server_topk(self, plan, server, completion, k):
        self.asked.append(f"server_topk {server.role} {k}")
        if self.refuse:
            raise ServerRefused(self.refuse)
        return self.scores(k)

    def server_top_logprobs(self, plan, server, k):
        self.asked.append(f"server_top_logprobs {k}")
        return k

    def prefix_caching(self, server):
        return self.caching

    def tokenizer_differences(self, plan, student):
        self.asked.append(f"tokenizer {student.name}")
        return self.differences


def plan(generation: GenerationSection, servers=(), students=(), api_teacher=False) -> Plan:
    teacher = None if api_teacher else "teacher"
    return Plan(teacher, "teacher", generation, MESSAGES, GOLD, list(servers), list(students), api_teacher=api_teacher)


def test_an_hf_only_recipe_checks_repeatability_and_tokenizers_and_skips_the_rest():
    probes = FakeProbes(differences=["vocabularies differ"])
    students = [StudentTokenizer("scratch", None, True), StudentTokenizer("seq-kd", "gpt2", False)]
    found = run_checks(plan(GenerationSection(splits=["train"]), students=students), probes)
    assert {c.name: c.status for c in found} == {
        "repeatable[generation: hf]": pf.PASSED,
        "backends_agree": pf.SKIPPED,
        "tokenizers[scratch]": pf.PASSED,
        "tokenizers[seq-kd]": pf.PASSED,
    }
    assert probes.asked == ["hf_answers", "tokenizer seq-kd"]  # no server, no top-k; a from-scratch student not loaded


def test_a_vllm_capture_checks_topk_prefix_caching_and_agreement_and_fails_where_refused():
    g = GenerationSection(splits=["train"])
    capture = Server("logit cache", "teacher", "http://127.0.0.1:1/v1", prompt_logprobs=20)
    found = {c.name: c for c in run_checks(plan(g, [capture]), FakeProbes())}
    label = capture.label
    assert found[f"max_logprobs[{label}]"].status == pf.PASSED
    assert found[f"prefix_caching[{label}]"].status == pf.PASSED
    assert found[f"backends_agree[HF vs {label}]"].status == pf.PASSED
    found = {c.name: c for c in run_checks(plan(g, [capture]), FakeProbes(caching=True))}
    assert found[f"prefix_caching[{label}]"].status == pf.FAILED
    refused = run_checks(plan(g, [capture]), FakeProbes(refuse="greater than max allowed: 5"))
    assert [c.status for c in refused if c.name.startswith("max_logprobs")] == [pf.FAILED]
    assert not [c for c in refused if c.name.startswith("backends_agree")]  # nothing to compare


def test_a_server_asked_for_text_only_is_not_compared_and_16_bits_get_a_wider_tolerance():
    g = GenerationSection(splits=["train"], backend="vllm")
    server = Server("generation", "teacher", args=("--dtype", "bfloat16"))
    probes = FakeProbes()
    found = {c.name: c for c in run_checks(plan(g, [server]), probes)}
    assert found["repeatable[generation: vllm]"].status == pf.PASSED
    skipped = found[f"backends_agree[HF vs {server.label}]"]
    assert skipped.status == pf.SKIPPED and "text only" in skipped.detail
    assert "hf_topk" not in probes.asked and not any(a.startswith("server_topk") for a in probes.asked)
    assert pf.tolerance(None) == pf.tolerance("float32") == pf.TOLERANCE < pf.tolerance("bfloat16")


def test_an_api_teacher_states_its_spread_and_its_top_logprobs_and_compares_nothing():
    g = GenerationSection(splits=["train"], backend="openai", logprobs=5, api={"base_url": "http://x/v1", "model": "m"})
    api = Server("generation", "m", "http://x/v1", top_logprobs=5)
    probes = FakeProbes(answers=["x", "y", "x"])
    found = {c.name: c for c in run_checks(plan(g, [api], api_teacher=True), probes)}
    assert found["repeatable[generation: openai]"].status == pf.PASSED
    assert "spread: 2 distinct answers of 3 (an API's model" in found["repeatable[generation: openai]"].detail
    assert found[f"max_logprobs[{api.label}]"].status == pf.PASSED
    assert found["backends_agree"].status == pf.SKIPPED and "hf_topk" not in probes.asked
    # Greedy answers of the run's own weights must agree.
    own = run_checks(plan(g, [api]), FakeProbes(answers=["x", "y", "x"]))
    assert own[0].name == "repeatable[generation: openai]" and own[0].status == pf.FAILED


def test_make_plan_from_recipe_sections(teacher_dir):
    lc = LogitCacheSection(source="vllm", k=8)  # kdflow starts the capture's server: the flags it would use
    students = [
        StudentSection(
            name="seq-kd", data="teacher", architecture={"hidden": 32, "layers": 1, "heads": 1, "intermediate": 64}
        ),
        StudentSection(name="fkl", data="teacher", model=str(teacher_dir), kd={"method": "offline"}),
    ]
    p = make_plan(str(teacher_dir), str(teacher_dir), GenerationSection(splits=["train"]), lc, students, MESSAGES, GOLD)
    (server,) = p.servers
    assert server.base_url is None and server.prompt_logprobs == 8 and NO_PREFIX_CACHING in server.args
    assert "--max-logprobs" in server.args and "--skip-tokenizer-init" not in server.args  # asked in text too
    assert p.students == [StudentTokenizer("seq-kd", None, False), StudentTokenizer("fkl", str(teacher_dir), True)]
    assert TeacherProbes().prefix_caching(server) is False  # off by the flags kdflow starts it with


# --- the real parts -----------------------------------------------------------------------------------------------


def test_a_real_tiny_hf_teacher_answers_greedily_the_same_and_its_tokenizer_is_compared(
    teacher_dir, other_tokenizer_dir
):
    p = plan(GenerationSection(splits=["train"], max_new_tokens=16))
    p.teacher_dir = p.tokenizer_dir = str(teacher_dir)
    with TeacherProbes() as probes:
        students = [
            StudentTokenizer("same", str(teacher_dir), True),
            StudentTokenizer("other", str(other_tokenizer_dir), True),
            StudentTokenizer("other-seq", str(other_tokenizer_dir), False),
        ]
        p.students = students
        found = {c.name: c for c in run_checks(p, probes)}
        ids, logprobs = probes.hf_topk(p, GOLD, 4)
    assert found["repeatable[generation: hf]"].status == pf.PASSED
    assert found["tokenizers[same]"].status == pf.PASSED
    assert found["tokenizers[other]"].status == pf.FAILED and "vocabularies differ" in found["tokenizers[other]"].detail
    assert "rendered prompt differs" in found["tokenizers[other]"].detail
    assert found["tokenizers[other-seq]"].status == pf.PASSED
    assert ids.shape == logprobs.shape and ids.shape[1] == 4 and (np.diff(logprobs, axis=1) <= 0).all()


@pytest.mark.slow
def test_the_real_vllm_server_agrees_with_hf_and_its_limits_are_found(vllm_server_url, vllm_model_dir, monkeypatch):
    """The session's server runs with vLLM's defaults: prefix caching on, at most 20 log-probs."""
    from tests.conftest import VLLM_TEST_API_KEY

    monkeypatch.setenv("VLLM_API_KEY", VLLM_TEST_API_KEY)
    model = str(vllm_model_dir)
    g = GenerationSection(splits=["train"], max_new_tokens=16)
    found = {}
    for k in (5, 25):
        lc = LogitCacheSection(source="vllm", base_url=vllm_server_url, k=k)
        p = make_plan(model, model, g, lc, [], MESSAGES, GOLD)
        with TeacherProbes() as probes:
            found[k] = {c.name.split("[")[0]: c for c in run_checks(p, probes)}
    agree = found[5]["backends_agree"]
    assert agree.status == pf.PASSED and agree.figures["max_abs_logprob_diff"] <= pf.TOLERANCE, agree.detail
    assert agree.figures["positions"] > 0 and agree.figures["top1_agreement"] == 1.0
    assert found[5]["max_logprobs"].status == pf.PASSED
    caching = found[5]["prefix_caching"]
    assert caching.status == pf.FAILED and "prefix caching is on" in caching.detail
    refused = found[25]["max_logprobs"]
    assert refused.status == pf.FAILED and "max allowed: 20" in refused.detail and "--max-logprobs 25" in refused.fix


@pytest.mark.slow
def test_kdflow_preflight_passes_on_the_mini_recipe_and_a_failed_check_stops_distill_before_generation(
    prefect_server, mini_recipe, other_tokenizer_dir
):
    from flows.distill import distill
    from flows.preflight import preflight
    from kdflow.config.recipe import load_recipe
    from kdflow.store import run_folder

    ref = preflight(str(mini_recipe))
    report = json.loads((Path(ref.path) / "preflight.json").read_text())
    assert report["passed"] and {c["name"] for c in report["checks"]} >= {
        "repeatable[generation: hf]",
        "backends_agree",
        "tokenizers[baseline]",
        "tokenizers[seq-kd]",
    }
    # A logit-KD student with a tokenizer of its own: the preflight fails, and nothing is generated.
    text = mini_recipe.read_text().replace(
        "evaluation:",
        f"  - name: logit-kd\n    data: teacher\n    model: {other_tokenizer_dir}\n    kd: {{method: offline}}\n"
        "    training: {max_steps: 2, per_device_train_batch_size: 4}\n\nlogit_cache: {k: 4}\n\nevaluation:",
        1,
    )
    mini_recipe.write_text(text)
    run_dir = load_recipe(mini_recipe).run_dir
    with pytest.raises(pf.PreflightFailed, match=r"tokenizers\[logit-kd\]: white-box KD .* Fix: use a student"):
        distill(str(mini_recipe))
    assert not run_folder.outputs(run_dir, "generate") and not (run_dir / "generate").exists()
    (failed,) = (run_dir / "preflight").glob("failed-*.json")
    assert json.loads(failed.read_text())["counts"]["failed"] == 1
    # The Prefect artifact says the same, failures first.
    markdown = latest_artifact("preflight")
    assert "FAILED" in markdown and markdown.index("tokenizers[logit-kd] | failed") < markdown.index("repeatable")


def latest_artifact(key: str) -> str:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        return max(found, key=lambda a: a.created).data

    return asyncio.run(read())
