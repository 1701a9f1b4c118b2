"""The distill flow end to end on the miniature recipe, and the stage cache around it (real Prefect)."""

import json
import shutil
from pathlib import Path

import pytest

from kdflow.config.recipe import load_recipe
from tests.conftest import assert_rerun_report

pytestmark = pytest.mark.slow

STAGE_RUNS = 13  # per distill run of mini.yaml with int8 copies: data (once: the teacher chain is given it), teacher,
# generate, curate, 2 students, 2 int8 copies, 5 evaluations
STAGES = {
    "make_data",
    "train_teacher_model",
    "generate_answers",
    "filter_answers",
    "train_student",
    "quantize_model",
    "evaluate_model",
}


def task_states(flow_run_id) -> dict[str, list[str]]:
    """Task name -> state names of the task runs of one flow run and its subflows.

    Selected by flow-run id, never by a time window: two distill runs less than a second apart (a fast
    machine) would otherwise count the previous run's task runs too."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    async def run_ids(client) -> list:
        ids, frontier = [flow_run_id], [flow_run_id]
        while frontier:  # the teacher's subflow, and any subflow of a subflow
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
            )
            frontier = [c.id for c in children if c.id not in ids]
            ids += frontier
        return ids

    async def read():
        # Task run states reach the server as events, recorded in batches: wait until all are final. The wait
        # ends on a condition (every expected run final), with a generous bound only against a hang.
        async with get_client() as client:
            ids = await run_ids(client)
            flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=ids))
            for _ in range(600):
                runs = await client.read_task_runs(flow_run_filter=flow_runs)
                runs = [r for r in runs if r.task_key.rsplit("-", 1)[0] in STAGES]
                if len(runs) >= STAGE_RUNS and all(r.state is not None and r.state.is_final() for r in runs):
                    break
                await asyncio.sleep(0.5)
            else:
                raise AssertionError(f"task run states never became final: {[r.state for r in runs]}")
        assert len(runs) == STAGE_RUNS, [r.name for r in runs]  # exactly this run's stages, no other run's
        states: dict[str, list[str]] = {}
        for run in runs:  # not write_report (it always runs) nor the subflow's placeholder task run
            states.setdefault(run.task_key.rsplit("-", 1)[0], []).append(run.state.name)
        return states

    return asyncio.run(read())


def run_distill(recipe_path) -> tuple[dict, dict[str, list[str]]]:
    from flows.distill import distill

    state = distill(str(recipe_path), return_state=True)
    return state.result(), task_states(state.state_details.flow_run_id)


def stage_names(states: dict[str, list[str]], state: str) -> set[str]:
    return {name for name, names in states.items() if state in names}


def test_distill_end_to_end_then_cached_then_partial_rerun(prefect_server, mini_recipe):
    # int8 copies of the students too: the quantize stage wired through the flow like any other
    mini_recipe.write_text(mini_recipe.read_text().replace("evaluation:\n", "evaluation:\n  quantize: [int8]\n", 1))
    recipe = load_recipe(mini_recipe)
    assert recipe.evaluation.quantize == ["int8"]

    # 1. A full run: every stage executes, the report has the teacher and both students.
    report, states = run_distill(mini_recipe)
    # The data is made once: the teacher chain is handed it (flows/train_teacher.teacher_chain), not a subflow.
    assert states.pop("make_data") == ["Completed"]
    assert stage_names(states, "Cached") == set()
    run_dir = recipe.run_dir
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk == report
    assert set(report["students"]) == {"baseline", "seq-kd", "baseline-int8", "seq-kd-int8"}
    for name in ("baseline", "seq-kd"):  # the copy is smaller and measured like its source
        q, f = report["students"][f"{name}-int8"], report["students"][name]
        assert q["size_bytes"] < f["size_bytes"] and q["memory_bytes_per_token"] < f["memory_bytes_per_token"]
    for m in [report["teacher"], *report["students"].values()]:
        assert m["energy_source"] in ("measured", "estimated") and m["energy_j_per_token"] > 0
        assert m["arithmetic_intensity"] > 0
    for m in [report["teacher"], *report["students"].values()]:
        assert 0.0 <= m["accuracy"] <= 1.0 and m["params"] > 0
    assert report["teacher"]["params"] > report["students"]["baseline"]["params"]
    md = (run_dir / "report.md").read_text()
    assert "| baseline | gold |" in md
    # The preflight that ran before the teacher answered: each of its checks a row of the report.
    [checked] = [json.loads((Path(p) / "preflight.json").read_text()) for p in (run_dir / "preflight").glob("*/")]
    assert report["preflight"] == {"teacher": checked} and checked["passed"] and checked["checks"]
    assert "## Teacher preflight" in md
    for check in checked["checks"]:
        assert f"| teacher | {check['name']} | {check['status']} |" in md
    # Quality and cost side by side for every model, measured in this run.
    assert report["teacher"]["agreement"] == 1.0 and report["teacher"]["kl"] == pytest.approx(0.0, abs=1e-6)
    for m in [report["teacher"], *report["students"].values()]:
        assert m["perplexity"] >= 1.0 and 0.0 <= m["agreement"] <= 1.0 and m["kl"] >= -1e-6
        for key in (
            "flops_per_token",
            "size_bytes",
            "peak_memory_bytes",
            "latency_ms_per_token",
            "throughput_tokens_per_s",
        ):
            assert m[key] > 0, key
    assert report["gap_closure"]["baseline"] == "baseline" and "gap_closure" in report["students"]["seq-kd"]
    assert report["deployment"]["machine"]["torch_threads"] >= 1 and report["lm_eval"]["status"] == "off"
    assert all((run_dir / png).is_file() for png in report["plots"]) and len(report["plots"]) == 2
    c = report["curation"]
    assert c["kept"] + c["dropped"] == c["input_rows"] == 80  # train 40 + prompts 40
    for stage in ("data", "teacher", "generate", "curate", "students", "evaluate", "deployment"):
        outputs = [p for p in (run_dir / stage).iterdir() if not p.name.startswith(".lock")]  # lock files
        assert outputs and all((p / "manifest.json").is_file() for p in outputs), stage

    # 2. The same recipe again: every stage is a cache hit, nothing recomputed.
    report2, states = run_distill(mini_recipe)
    executed = stage_names(states, "Completed")
    assert executed == set(), f"stages recomputed on an unchanged rerun: {executed}"
    assert stage_names(states, "Cached") == STAGES
    assert_rerun_report(report2, report)

    # 3. Only the student section changes: only students (and their evaluations) run again.
    text = mini_recipe.read_text().replace(
        "learning_rate: 3.0e-3, logging_steps: 5}", "learning_rate: 1.0e-3, logging_steps: 5}", 1
    )
    mini_recipe.write_text(text)
    _, states = run_distill(mini_recipe)
    assert stage_names(states, "Completed") == {"train_student", "quantize_model", "evaluate_model"}
    assert states["train_student"].count("Completed") == 1  # the other student is untouched
    assert states["quantize_model"].count("Completed") == 1
    assert states["evaluate_model"].count("Completed") == 2  # the student and its int8 copy
    assert {"make_data", "train_teacher_model", "generate_answers", "filter_answers"} <= stage_names(states, "Cached")

    # 4. A deleted output folder is recomputed, not trusted; what follows it is reused when its content is
    #    unchanged (the curate stage's output is deterministic given the same answers).
    for folder in (run_dir / "curate").iterdir():
        if folder.is_dir():  # not the stage folder's lock file
            shutil.rmtree(folder)
    _, states = run_distill(mini_recipe)
    assert states["filter_answers"] == ["Completed"]
    assert "Cached" in states["generate_answers"]
    assert all((p / "manifest.json").is_file() for p in (run_dir / "curate").iterdir() if p.is_dir())
    # ... and the recomputed output is trusted again: the next run is a plain cache hit.
    _, states = run_distill(mini_recipe)
    assert states["filter_answers"] == ["Cached"]


def test_report_artifact_is_published(prefect_server, mini_recipe):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from flows.distill import distill

    flow_run_id = distill(str(mini_recipe), return_state=True).state_details.flow_run_id

    async def of_this_run(key: str):  # by flow-run id: other runs of the session publish the same keys
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )

    artifacts = asyncio.run(of_this_run("mini-report"))
    assert len(artifacts) == 1 and "kdflow report: mini" in artifacts[0].data
    assert len(asyncio.run(of_this_run("mini-table"))) == 1, "no mini-table artifact"


def test_a_bad_recipe_fails_before_any_work(prefect_server, tmp_path):
    from flows.distill import distill
    from kdflow.config.loading import RecipeError

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        Path(__file__)
        .parent.with_name("mini.yaml")
        .read_text()
        .replace("root: runs", f"root: {tmp_path}/runs")
        .replace("heads: 2,", "heads: 4,", 1)
    )
    with pytest.raises(RecipeError, match="teacher.architecture: head dimension"):
        distill(str(bad))
    assert not (tmp_path / "runs").exists()
