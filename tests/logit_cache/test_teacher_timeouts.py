"""A teacher that stops answering fails the stage, naming the step and the teacher (issue 23, finding 4): a
scoring process stopped with SIGSTOP, a vLLM server that accepts connections and never replies, on-policy training
against it, and a vLLM logit-cache capture against it. Each fault is permanent, so the timeout (tiny here) is the
only way out of the wait: nothing depends on how fast the machine is."""

import os
import signal
import socket
import threading

import numpy as np
import openai
import pytest
import torch

from kdflow.config.kd import OnPolicyKD
from kdflow.config.logit_cache import LogitCacheSection
from kdflow.logit_cache.capture import capture_vllm
from kdflow.logit_cache.scoring import HFScorer, TeacherScoringError, VllmScorer
from kdflow.logit_cache.topk import EncodedRow
from kdflow.store.outputs import canonical
from kdflow.training.on_policy import prompt_rows, train_on_policy
from kdflow.training.tiny_models import llama_model
from tests.logit_cache.test_capture import tiny_teacher
from tests.training.test_on_policy import op_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher") / "model"
    _, tokenizer = tiny_teacher(folder, sharpen=20.0)
    return folder, tokenizer


@pytest.fixture
def silent_server():
    """The base URL of a server that accepts every connection, reads nothing and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # the listening socket was shut down: the test is over
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    thread.join(10)
    for conn in held:
        conn.close()


@pytest.fixture
def no_retries(monkeypatch):
    """The openai client without retries: each retry would only repeat the same timeout after a backoff."""
    real = openai.OpenAI
    monkeypatch.setattr(openai, "OpenAI", lambda **kw: real(**{**kw, "max_retries": 0}))


def chat_rows(n: int) -> list[dict]:
    return [
        {
            "row_id": f"r{i}",
            "prompt": [{"role": "user", "content": f"Solve step by step: {i % 10}+{i % 7}"}],
            "completion": [{"role": "assistant", "content": f"{i % 10}+{i % 7}={i % 10 + i % 7}"}],
        }
        for i in range(n)
    ]


def test_the_timeouts_are_recipe_fields_left_out_of_the_keys():
    assert OnPolicyKD(method="on_policy").timeout_s == LogitCacheSection().timeout_s == 600.0
    assert canonical(OnPolicyKD(method="on_policy", timeout_s=5)) == canonical(OnPolicyKD(method="on_policy"))
    assert canonical(LogitCacheSection(timeout_s=5)) == canonical(LogitCacheSection())
    with pytest.raises(ValueError, match="timeout_s"):
        OnPolicyKD(method="on_policy", timeout_s=0)


def test_a_stopped_scoring_process_fails_the_wait_after_the_timeout_and_is_killed(teacher, tmp_path):
    folder, tok = teacher
    scorer = HFScorer(folder, 5, tmp_path / "scorer.log", threads=1)  # loads under the default timeout
    try:
        row = EncodedRow("x", np.asarray(prompt_rows(tok, chat_rows(1), None)[0]["input_ids"]), 5)
        assert len(scorer.score([row])[0].ids) == len(row.input_ids) - 6  # healthy
        scorer.timeout_s = 0.5
        os.kill(scorer.proc.pid, signal.SIGSTOP)
        # larger than a pipe holds (64 KiB), so that sending it blocks too until the child is killed
        big = EncodedRow("big", np.arange(20_000) % len(tok), 5)
        with pytest.raises(
            TeacherScoringError,
            match=r"scoring process for .* gave no answer within 0.5 s while "
            r"scoring 2 samples, and was killed \(raise kd.timeout_s",
        ):
            scorer.score([row, big])
        assert scorer.proc.returncode == -signal.SIGKILL
        with pytest.raises(TeacherScoringError, match="exited with code -9 while scoring 1 samples"):
            scorer.score([row])  # the next request is told the process is gone, at once
    finally:
        if scorer.proc.poll() is None:
            scorer.proc.kill()
        scorer.close()


def test_a_server_that_never_answers_is_a_scoring_error_after_the_timeout(silent_server):
    scorer = VllmScorer(silent_server, "teacher", 3, concurrency=2, max_retries=1, timeout_s=0.3)
    rows = [EncodedRow(f"r{i}", np.arange(8), 2) for i in range(3)]
    try:
        with pytest.raises(
            TeacherScoringError,
            match=r"vLLM server at http://127.0.0.1:\d+/v1 gave no answer within "
            r"0.3 s on any of 2 tries while scoring 3 samples",
        ):
            scorer.score(rows)
    finally:
        scorer.close()


def test_a_malformed_server_reply_is_a_scoring_error_not_a_plain_exception():
    from types import SimpleNamespace

    class Completions:  # 200 OK with something else than vLLM's prompt_logprobs
        def create(self, model, prompt, max_tokens, temperature, extra_body):
            return SimpleNamespace(
                choices=[
                    SimpleNamespace(index=i, prompt_logprobs=[None, {"3": {"logprob": -1}}]) for i in range(len(prompt))
                ]
            )

    scorer = VllmScorer("http://127.0.0.1:9/v1", "teacher", 3, concurrency=1)
    scorer.client = SimpleNamespace(completions=Completions(), close=lambda: None)
    with pytest.raises(
        TeacherScoringError,
        match=r"sent a reply that is not prompt_logprobs for 1 samples "
        r"\(ValueError: row 'r0': 2 prompt_logprobs for 6 tokens\)",
    ):
        scorer.score([EncodedRow("r0", np.arange(6), 2)])


def test_on_policy_training_against_a_silent_server_fails_naming_the_step(teacher, silent_server, no_retries, tmp_path):
    folder, tok = teacher
    kd = OnPolicyKD(
        method="on_policy", k=5, max_new_tokens=4, teacher_backend="vllm", base_url=silent_server, timeout_s=0.3
    )
    training = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_length": 64}
    student = llama_model(tok, hidden=32, layers=1, heads=1, intermediate=64, seed=0)
    with pytest.raises(
        TeacherScoringError,
        match=r"(?s)gave no answer within 0.3 s on any of 1 tries .*"
        r"On-policy training stopped at step 1, before its update",
    ):
        train_on_policy(
            student, tok, chat_rows(8), op_config(kd, folder, None, training, tmp_path / "out"), tmp_path / "out"
        )
    assert not (tmp_path / "out" / "model").exists()


def test_a_vllm_capture_against_a_silent_server_fails_naming_the_rows(teacher, silent_server, no_retries, tmp_path):
    from kdflow.logit_cache.capture import encoded_rows

    folder, tok = teacher
    kept = [
        {"id": f"prompts-{i:06d}", "sample": 0, "question": f"{i}+1", "text": f"{i}+1={i + 1}\nAnswer: {i + 1}"}
        for i in range(3)
    ]
    rows = encoded_rows(kept, "Solve step by step: {{ question }}", tok)
    section = LogitCacheSection(source="vllm", base_url=silent_server, k=3, shard_rows=2, timeout_s=0.3)
    with pytest.raises(
        TeacherScoringError,
        match=r"gave no answer within 0.3 s on any of 1 tries while capturing "
        r"rows 0 to 1 \(raise logit_cache.timeout_s",
    ):
        capture_vllm(tmp_path / "cache", str(folder), rows, section, {"k": 3}, None)


def test_on_policy_k_above_the_vocabulary_is_refused_before_the_teacher_starts(teacher, tmp_path, monkeypatch):
    """Issue 23, finding 9: k = 100 on a 48-token vocabulary reached the teacher, whose top-k failed, and the error
    advised a rerun once the teacher answered again."""
    import kdflow.training.on_policy_scoring as scoring

    folder, tok = teacher
    monkeypatch.setattr(scoring, "teacher_scorer", lambda *a, **kw: pytest.fail("the teacher was started"))
    student = llama_model(tok, hidden=32, layers=1, heads=1, intermediate=64, seed=0)
    kd = OnPolicyKD(method="on_policy", k=100)
    with pytest.raises(
        ValueError,
        match=rf"kd.k = 100 exceeds the student's vocabulary \({len(tok)} tokens\): .* use "
        rf"k <= {len(tok)}",
    ):
        train_on_policy(
            student,
            tok,
            chat_rows(4),
            op_config(kd, folder, None, {"max_steps": 1}, tmp_path / "out"),
            tmp_path / "out",
        )


def test_a_launched_on_policy_student_gets_the_teachers_url_whole_while_its_job_file_holds_it_redacted(
    tmp_path, monkeypatch
):
    """Issue 23, finding 9: the job file (a JSON dump) held https://***@host, and the launched processes read it."""
    from kdflow.config.student import StudentSection
    from kdflow.store.outputs import OutputRef
    from kdflow.training.student import TEACHER_URL_ENV, StudentJob

    url = "https://user:s3cret@teacher.example:8000/v1"
    launch = {"accelerate_config": "accelerate/cpu_2proc.yaml", "num_processes": 2}
    section = StudentSection(
        name="op",
        data="teacher",
        launch=launch,
        architecture={"hidden": 32, "layers": 1, "heads": 1, "intermediate": 64},
        kd={"method": "on_policy", "teacher_backend": "vllm", "base_url": url},
    )
    ref = OutputRef(stage="x", key="k" * 64, path=str(tmp_path), sha256="0" * 64)
    job = StudentJob(section=section, template="{{ question }}", teacher=ref, data=ref)
    job.write(tmp_path / "job.json")
    assert "s3cret" not in (tmp_path / "job.json").read_text()
    assert job.secrets() == {TEACHER_URL_ENV: url}
    monkeypatch.delenv(TEACHER_URL_ENV, raising=False)
    assert StudentJob.read(tmp_path / "job.json").section.kd.base_url == "https://***@teacher.example:8000/v1"
    monkeypatch.setenv(TEACHER_URL_ENV, url)  # what launch_student puts in the launched processes' environment
    assert StudentJob.read(tmp_path / "job.json").section.kd.base_url == url
    monkeypatch.setenv(TEACHER_URL_ENV, "https://user:pw@elsewhere:1/v1")  # another server's: not taken
    assert StudentJob.read(tmp_path / "job.json").section.kd.base_url == "https://***@teacher.example:8000/v1"

    import subprocess
    from types import SimpleNamespace

    from kdflow.training.student import launch_student

    monkeypatch.delenv(TEACHER_URL_ENV)
    handed = {}
    monkeypatch.setattr(subprocess, "run", lambda cmd, env, **kw: handed.update(env) or SimpleNamespace(returncode=1))
    with pytest.raises(RuntimeError, match="exited with 1"):
        launch_student(job, tmp_path / "out", tmp_path / "launch.json", tmp_path / "launch.log")
    assert handed[TEACHER_URL_ENV] == url and "s3cret" not in (tmp_path / "launch.json").read_text()
