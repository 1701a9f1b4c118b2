"""The API teacher (``teacher: {api: true}``): the model generation.api names is the teacher. Refusals at recipe load
(what needs its weights), the report's teacher row without weight metrics, and the distill flow end to end against
the local vLLM server standing in for the API (no teacher trained or loaded, the API's accuracy in the report)."""

import asyncio
from pathlib import Path

import pytest

from kdflow.config.loading import RecipeError
from kdflow.config.recipe import load_recipe, parse_recipe
from kdflow.evaluation.api_model import WEIGHTS_UNAVAILABLE
from kdflow.reporting.plots import plot_tradeoff
from kdflow.reporting.run_report import build_report, render_markdown, table_rows
from tests.conftest import MINI_RECIPE, VLLM_TEST_API_KEY, assert_rerun_report

KEY_ENV = "KDFLOW_TEST_TEACHER_KEY"
LOCAL_TEACHER = """teacher:
  architecture: {hidden: 64, layers: 1, heads: 2, intermediate: 128}
  vocab_size: 48
  training: {max_steps: 150, per_device_train_batch_size: 32, learning_rate: 5.0e-3, logging_steps: 50}
"""


def api_recipe(
    base_url: str = "http://127.0.0.1:9/v1", model: str = "served-model", extra: str = "", generation: str | None = None
) -> str:
    """mini.yaml with the API teacher: few rows, few steps, and filters that keep every answer (the tiny served
    model answers the arithmetic wrongly; its answers still train the seq-kd student)."""
    text = MINI_RECIPE.read_text().replace(LOCAL_TEACHER, "teacher:\n  api: true\n  vocab_size: 48\n")
    text = text.replace(
        "splits: {teacher: 200, train: 40, prompts: 40, test: 30}",
        "splits: {teacher: 100, train: 16, prompts: 16, test: 10}",
    )
    generation = generation or (
        f"  backend: openai\n  api: {{base_url: '{base_url}', model: '{model}', "
        f"api_key_env: {KEY_ENV}, concurrency: 4, timeout_s: 60}}\n"
    )
    text = text.replace(
        "  batch_size: 64\n\nstudents",
        f"  batch_size: 64\n{generation}\n"
        "filters: {correctness: false, truncated: false, empty: false}\n" + extra + "\nstudents",
        1,
    )
    assert "api: true" in text, "mini.yaml's teacher section changed: update LOCAL_TEACHER"
    return text


def problems(text: str) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "api.yaml")
    return str(e.value)


def test_api_teacher_recipe_loads_and_keys_no_local_teacher():
    r = parse_recipe(api_recipe(), "api.yaml")
    assert r.teacher.api and r.teacher.model is None and r.teacher.architecture is None
    assert r.generation.api.identity() == {
        "model": "served-model",
        "base_url": "http://127.0.0.1:9/v1",
        "endpoint": "chat",
    }
    shipped = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "api-teacher.yaml")
    assert shipped.teacher.api and shipped.generation.api.model


def test_api_teacher_needs_the_openai_backend_and_a_model_name():
    hf = api_recipe(generation="  backend: hf\n")
    assert "generation.backend: teacher.api: true asks the model generation.api names" in problems(hf)
    nameless = api_recipe(generation="  backend: openai\n  api: {base_url: 'http://127.0.0.1:9/v1'}\n")
    assert "generation.api: teacher.api: true: name the API's model" in problems(nameless)
    both = api_recipe().replace("  api: true\n", "  api: true\n  model: some/model\n")
    assert "remove teacher.model" in problems(both)


@pytest.mark.parametrize(
    "extra, field",
    [
        ("logit_cache: {k: 5}\n", "logit_cache"),
        ("logit_cache: {source: vllm, k: 5}\n", "logit_cache"),
        ("logit_cache: {source: api, k: 5}\n", "logit_cache"),
    ],
)
def test_white_box_parts_are_refused_with_the_reason(extra, field):
    msg = problems(api_recipe(extra=extra))
    assert f": {field}: teacher.api: true: the API model is the teacher and its weights are not available" in msg


def test_kd_students_and_the_judge_filter_are_refused():
    online = api_recipe().replace(
        "  - name: seq-kd\n    data: teacher\n",
        "  - name: seq-kd\n    data: teacher\n    kd: {method: online, divergence: jsd}\n",
    )
    msg = problems(online)
    assert "students.1.kd: student 'seq-kd': teacher.api: true" in msg and "kd (online) needs" in msg
    judged = api_recipe().replace(
        "filters: {correctness: false, truncated: false, empty: false}", "filters: {correctness: false, judge: {}}"
    )
    assert "filters.judge: teacher.api: true" in problems(judged)


def api_teacher_report() -> dict:
    api = {"model": "gpt-x", "base_url": "https://api.example/v1", "endpoint": "chat"}
    teacher = {
        "accuracy": 0.9,
        "rows": 10,
        "split": "test",
        "failed": 0,
        "model": "gpt-x",
        "api": api,
        "weights": WEIGHTS_UNAVAILABLE,
    }
    student = {
        "params": 1000,
        "rows": 10,
        "split": "test",
        "perplexity": 2.0,
        "reference_tokens": 300,
        "agreement_skipped": WEIGHTS_UNAVAILABLE,
        "latency_ms_per_token": 1.0,
        "context": 20,
    }
    students = {
        "baseline": {**student, "accuracy": 0.3, "data": "gold"},
        "seq-kd": {**student, "accuracy": 0.6, "data": "teacher"},
    }
    deployment = {
        "machine": {"device": "cpu", "cpu_count": 2, "torch": "2", "torch_threads": 1},
        "settings": {"throughput_batch": 4, "latency_tokens": 8, "repeats": 1},
        "flops_formula": "2N",
    }
    return build_report(
        "api", teacher, students, {"input_rows": 4, "kept": 4, "dropped": 0, "drop_reasons": {}}, deployment
    )


def test_report_has_the_api_model_as_teacher_without_weight_metrics():
    report = api_teacher_report()
    assert report["students"]["seq-kd"]["gap_closure"] == pytest.approx(0.5)
    assert report["students"]["seq-kd"]["compression"] is None and report["students"]["seq-kd"]["vs_teacher"] == {}
    md = render_markdown(report)
    assert "| teacher | API model gpt-x | 0.900 | 1 (teacher) | — | — | — |" in md
    assert "`gpt-x` behind an OpenAI-compatible API (https://api.example/v1)" in md and WEIGHTS_UNAVAILABLE in md
    assert "agreement not measured" not in md  # said once, for the teacher, not per student
    assert table_rows(report)[0]["data"] == "API model gpt-x" and table_rows(report)[0]["params"] is None
    assert plot_tradeoff(report)  # the teacher is a dashed line where it has no parameters or latency


def task_run_names(flow_run_id, until: str) -> list[str]:
    """Names of the task runs of a flow run and its subflows, once one named ``until...`` is recorded (task runs
    reach the server as events, in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    async def read():
        async with get_client() as client:
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
            )
            ids = [flow_run_id, *(c.id for c in children)]
            for _ in range(120):
                runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
                names = [r.name for r in runs]
                if any(n.startswith(until) for n in names):
                    return names
                await asyncio.sleep(0.5)
            raise AssertionError(f"no task run {until}... among {names}")

    return asyncio.run(read())


@pytest.mark.slow
def test_distill_with_an_api_teacher_end_to_end(prefect_server, vllm_server_url, vllm_model_dir, tmp_path, monkeypatch):
    from flows.distill import distill

    monkeypatch.setenv(KEY_ENV, VLLM_TEST_API_KEY)
    served = str(vllm_model_dir)
    path = tmp_path / "api.yaml"
    path.write_text(api_recipe(vllm_server_url, served).replace("root: runs", f"root: {tmp_path / 'runs'}"))
    r = load_recipe(path)

    state = distill(str(path), return_state=True)
    report = state.result()
    names = task_run_names(state.state_details.flow_run_id, "evaluate_api_teacher")

    # No teacher was trained or loaded: the teacher stage recorded the API model and the students' tokenizer only.
    assert not any(n.startswith(("train_teacher_model", "use_existing_teacher")) for n in names), names
    assert f"record_api_teacher[{served}]" in names and f"evaluate_api_teacher[{served}]" in names
    (teacher,) = [p for p in (r.run_dir / "teacher").iterdir() if p.is_dir()]
    manifest = (teacher / "manifest.json").read_text()
    assert served in manifest and '"weights": null' in manifest
    assert not [f for f in teacher.rglob("*") if f.suffix in (".safetensors", ".bin")]
    assert (teacher / "tokenizer" / "tokenizer.json").is_file()

    # The report's teacher row is the API model, its accuracy asked through the API; no weight metrics for it.
    t = report["teacher"]
    assert t["model"] == served and t["api"]["base_url"] == vllm_server_url and t["rows"] == 10
    assert 0.0 <= t["accuracy"] <= 1.0 and t["failed"] == 0 and t["weights"] == WEIGHTS_UNAVAILABLE
    assert not {"params", "perplexity", "agreement", "kl", "latency_ms_per_token"} & set(t)
    # Students trained (seq-kd on the API's answers, all kept), evaluated, measured; gap closure computed.
    assert report["curation"]["kept"] == report["curation"]["input_rows"] == 32
    for name in ("baseline", "seq-kd"):
        s = report["students"][name]
        assert s["params"] > 0 and s["perplexity"] >= 1.0 and s["latency_ms_per_token"] > 0
        assert s["agreement_skipped"] == WEIGHTS_UNAVAILABLE and "gap_closure" in s
    assert report["gap_closure"]["baseline"] == "baseline" and report["gap_closure"]["note"]
    md = (r.run_dir / "report.md").read_text()
    assert f"| teacher | API model {served} |" in md and WEIGHTS_UNAVAILABLE in md
    # The key is in no file of the run folder.
    for f in r.run_dir.rglob("*"):
        assert not f.is_file() or VLLM_TEST_API_KEY.encode() not in f.read_bytes(), f

    # A rerun asks the API nothing (every request goes through api_client._create): every stage is cached, the
    # report the same.
    from kdflow.teacher import api_client

    async def no_request(*args, **kwargs):
        raise AssertionError("an unchanged rerun sent a request to the API")

    monkeypatch.setattr(api_client, "_create", no_request)
    assert_rerun_report(distill(str(path)), report)
