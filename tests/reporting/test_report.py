"""The report: gap closure and ratios on known numbers, every metric on the page, the files and Prefect
artifacts written, lm-eval's skip stated, and the command that compares run folders."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdflow.reporting import compare
from kdflow.reporting.run_report import baseline_student, build_report, gap_closure, render_markdown, table_rows

ROOT = Path(__file__).resolve().parents[2]
CURATION = {"input_rows": 10, "kept": 8, "dropped": 2, "drop_reasons": {"wrong_answer": 2}}
DEPLOYMENT = {
    "machine": {"device": "test CPU", "cpu_count": 2, "torch_threads": 1, "platform": "linux", "torch": "2"},
    "settings": {"latency_tokens": 32, "throughput_batch": 64, "repeats": 5},
    "flops_formula": "2N + 4·L·h·hd·c",
}


def model(accuracy: float, params: int, **extra) -> dict:
    return {
        "accuracy": accuracy,
        "params": params,
        "rows": 100,
        "split": "test",
        "perplexity": 1.5,
        "agreement": 0.9,
        "kl": 0.05,
        "reference_tokens": 1000,
        "flops_per_token": 2 * params,
        "size_bytes": 4 * params,
        "peak_memory_bytes": 10 * params,
        "latency_ms_per_token": params / 1e5,
        "throughput_tokens_per_s": 1e9 / params,
        "context": 40.5,
        **extra,
    }


def planted_report(run="demo") -> dict:
    teacher = model(0.9, 1_000_000, agreement=1.0, kl=0.0)
    students = {
        "baseline": {**model(0.5, 100_000), "data": "gold"},
        "seq-kd": {**model(0.8, 100_000), "data": "teacher"},
    }
    return build_report(run, teacher, students, CURATION, DEPLOYMENT)


def test_gap_closure_known_values():
    assert gap_closure(0.8, baseline=0.5, teacher=1.0) == pytest.approx(0.6)
    assert gap_closure(0.5, baseline=0.5, teacher=1.0) == 0.0
    assert gap_closure(1.0, baseline=0.5, teacher=1.0) == 1.0
    assert gap_closure(0.4, baseline=0.5, teacher=1.0) == pytest.approx(-0.2)  # worse than no KD: negative
    assert gap_closure(0.7, baseline=0.6, teacher=0.6) is None  # no gap to close


def test_report_gap_closure_ratios_and_backward_compatible_fields():
    r = planted_report()
    assert r["gap_closure"]["baseline"] == "baseline"
    assert r["students"]["seq-kd"]["gap_closure"] == pytest.approx(0.75)  # (0.8 - 0.5) / (0.9 - 0.5)
    assert r["students"]["baseline"]["gap_closure"] == 0.0
    ratio = r["students"]["seq-kd"]["vs_teacher"]
    assert ratio["params"] == pytest.approx(0.1) and ratio["throughput_tokens_per_s"] == pytest.approx(10)
    # what older readers of report.json rely on
    assert {"accuracy", "params"} <= set(r["teacher"]) and r["students"]["seq-kd"]["compression"] == 10.0


def test_a_figure_that_could_not_be_had_says_why():
    r = planted_report()
    r["students"]["seq-kd"] |= {
        "agreement": None,
        "agreement_skipped": "the student's tokenizer differs from the teacher's",
    }
    md = render_markdown(r)
    assert "| seq-kd | teacher | 0.800 | 0.75 | 1.500 | — |" in md
    assert "- seq-kd: agreement not measured: the student's tokenizer differs from the teacher's" in md


def test_no_gold_student_means_gap_closure_not_applicable():
    students = {"seq-kd": {**model(0.8, 100), "data": "teacher"}}
    assert baseline_student(students) is None
    r = build_report("x", model(0.9, 1000), students, CURATION)
    assert r["students"]["seq-kd"]["gap_closure"] is None
    assert r["gap_closure"]["note"].startswith("not applicable")
    assert "not applicable" in render_markdown(r)


def test_markdown_shows_every_metric_for_every_model():
    md = render_markdown(planted_report(), {"training loss per model": "report-loss.png"})
    for header in (
        "accuracy",
        "gap closed",
        "perplexity",
        "top-1 agreement",
        "KL(teacher ‖ model)",
        "parameters",
        "FLOPs / token",
        "size on disk",
        "peak memory",
        "latency ms / token (batch 1)",
        "throughput tokens / s (batch 64)",
    ):
        assert header in md, header
    assert "| teacher | gold | 0.900 | 1 (teacher) | 1.500 | 1.000 | 0.0000 |" in md
    assert "| seq-kd | teacher | 0.800 | 0.75 |" in md
    assert "| baseline | 100,000 (0.1×) | 200 k (0.1×) | 400 kB (0.1×) | 1 MB (0.1×) |" in md
    assert "2N + 4·L·h·hd·c" in md and "test CPU" in md and "![training loss per model](report-loss.png)" in md
    assert "lm-evaluation-harness: off" in md
    rows = table_rows(planted_report())
    assert [r["model"] for r in rows] == ["teacher", "baseline", "seq-kd"] and rows[2]["gap_closure"] == pytest.approx(
        0.75
    )


JUDGE = {
    "judge": {
        "backend": "openai",
        "model": "gpt-judge",
        "base_url": "http://judge/v1",
        "template": "prompts/judge.jinja",
    },
    "split": "test",
    "questions": 50,
    "win_rates": {
        "baseline": {
            "win_rate": 0.25,
            "judged": 98,
            "wins": 10,
            "ties": 29,
            "losses": 59,
            "unparsed": 1,
            "failed": 1,
            "pairs_parsed": 48,
            "consistent_pairs": 40,
        },
        "seq-kd": {
            "win_rate": 0.45,
            "judged": 100,
            "wins": 30,
            "ties": 30,
            "losses": 40,
            "unparsed": 0,
            "failed": 0,
            "pairs_parsed": 50,
            "consistent_pairs": 44,
        },
    },
}


def test_judge_win_rate_column_and_counts_when_a_judge_ran():
    teacher = model(0.9, 1_000_000, agreement=1.0, kl=0.0)
    students = {
        "baseline": {**model(0.5, 100_000), "data": "gold"},
        "seq-kd": {**model(0.8, 100_000), "data": "teacher"},
    }
    r = build_report("demo", teacher, students, CURATION, DEPLOYMENT, judge=JUDGE)
    assert r["judge"]["status"] == "done" and r["judge"]["questions"] == 50 and "win_rates" not in r["judge"]
    assert r["students"]["seq-kd"]["judge_win_rate"] == 0.45 and r["students"]["baseline"]["judge"]["failed"] == 1
    md = render_markdown(r)
    assert "| KL(teacher ‖ model) | judge win rate vs teacher |" in md
    assert "| teacher | gold | 0.900 | 1 (teacher) | 1.500 | 1.000 | 0.0000 | (reference) |" in md
    assert "| seq-kd | teacher | 0.800 | 0.75 | 1.500 | 0.900 | 0.0500 | 0.450 |" in md
    assert (
        "`gpt-judge` (openai, template `prompts/judge.jinja`)" in md and "first 50 questions of the `test` split" in md
    )
    assert "    - baseline: 10 wins, 29 ties, 59 losses; 1 replies without a verdict, 1 requests failed; 40 of 48" in md
    assert [row["judge_win_rate"] for row in table_rows(r)] == [None, 0.25, 0.45]
    text = compare.render({"demo": r, "old": planted_report("old")})
    assert "| demo | seq-kd | teacher | 0.800 | 0.75 | 1.500 | 0.900 | 0.0500 | 0.450 |" in text
    assert "| old | seq-kd | teacher | 0.800 | 0.75 | 1.500 | 0.900 | 0.0500 | — |" in text


def test_no_judge_means_no_column_and_says_not_run():
    r = planted_report()
    assert r["judge"] == {"status": "not run", "reason": "the recipe sets no evaluation.judge"}
    md = render_markdown(r)
    assert "judge win rate" not in md.split("## How")[0]
    assert "- **Judge win rate vs teacher**: not run (set `evaluation.judge` in the recipe" in md
    assert "judge_win_rate" not in table_rows(r)[1]


def test_lm_eval_skip_and_results_are_shown():
    r = planted_report()
    r["lm_eval"] = {"status": "skipped", "reason": "no CUDA GPU"}
    assert "lm-evaluation-harness: **skipped**: no CUDA GPU." in render_markdown(r)
    r["lm_eval"] = {
        "status": "done",
        "tasks": ["gsm8k"],
        "limit": None,
        "results": {
            "teacher": {"gsm8k": {"exact_match,strict-match": 0.7}},
            "seq-kd": {"gsm8k": {"exact_match,strict-match": 0.4}},
        },
    }
    md = render_markdown(r)
    assert "| model | gsm8k exact_match,strict-match |" in md and "| seq-kd | 0.400 |" in md


def test_loss_curves_keep_the_ce_and_kd_terms_apart():
    from kdflow.reporting.plots import loss_curves, plot_losses

    history = [
        {"loss": 2.0, "ce_loss": 1.5, "kd_loss": 2.5, "step": 5, "learning_rate": 1e-3, "epoch": 0.1},
        {"loss": 1.0, "ce_loss": 0.5, "kd_loss": 1.5, "step": 10},
        {"eval_loss": 9.0, "step": 10},  # an evaluation, not a training term
        {"train_loss": 1.5, "train_runtime": 3.0, "step": 10},
    ]  # the end-of-training summary
    assert loss_curves(history) == {
        "loss": ([5, 10], [2.0, 1.0]),
        "ce_loss": ([5, 10], [1.5, 0.5]),
        "kd_loss": ([5, 10], [2.5, 1.5]),
    }
    assert loss_curves([{"loss": 3.0, "step": 1}]) == {"loss": ([1], [3.0])}  # plain SFT: the total only
    assert plot_losses({"seq-kd": history, "baseline": [{"loss": 3.0, "step": 1}]}).startswith(b"\x89PNG")
    assert plot_losses({"teacher": []}) is None  # no model trained here: no plot, not an empty one


# ---- the comparison command ---------------------------------------------------------------------------


def write_run(folder: Path, report: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_compare_two_run_folders(tmp_path, capsys):
    a = write_run(tmp_path / "runs" / "demo", planted_report("demo"))
    longer = planted_report("demo-long")
    longer["students"]["seq-kd"]["accuracy"] = 0.85
    b = write_run(tmp_path / "runs" / "demo-long", longer)
    out_file = tmp_path / "compare.md"
    assert compare.main([str(a), str(b), "--out", str(out_file)]) == 0
    table = capsys.readouterr().out
    assert table == out_file.read_text()
    lines = [line for line in table.splitlines() if line.startswith("| demo")]
    assert [line.split(" | ")[:2] for line in lines] == [
        ["| demo", "teacher"],
        ["| demo", "baseline"],
        ["| demo", "seq-kd"],
        ["| demo-long", "teacher"],
        ["| demo-long", "baseline"],
        ["| demo-long", "seq-kd"],
    ]
    assert "| demo | seq-kd | teacher | 0.800 | 0.75 |" in table
    assert "| demo-long | seq-kd | teacher | 0.850 | 0.75 |" in table  # the report's own figure, not recomputed
    assert "- demo: test CPU" in table


def test_compare_reads_old_reports_and_says_what_is_missing(tmp_path):
    old = write_run(
        tmp_path / "old",
        {
            "run": "old",
            "teacher": {"accuracy": 0.9, "params": 1000},
            "students": {"s": {"accuracy": 0.5, "params": 100, "data": "gold"}},
        },
    )
    new = write_run(tmp_path / "new", planted_report("new"))
    text = compare.render({"old": compare.load_report(old), "new": compare.load_report(new / "report.json")})
    assert "| old | s | gold | 0.500 | — | — | — | — | — | 100 | — | — | — |" in text
    assert "- old: not recorded" in text
    with pytest.raises(FileNotFoundError, match="no report.json"):
        compare.load_report(tmp_path / "missing")


def test_compare_command_line(tmp_path):
    a = write_run(tmp_path / "a" / "demo", planted_report())
    b = write_run(tmp_path / "b" / "demo", planted_report())  # same folder name: labelled by path
    done = subprocess.run(
        [sys.executable, "-m", "kdflow.reporting.compare", str(a), str(b)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"| {a} | teacher |" in done.stdout and f"| {b} | seq-kd |" in done.stdout
    one = subprocess.run(
        [sys.executable, "-m", "kdflow.reporting.compare", str(a)], cwd=ROOT, capture_output=True, text=True
    )
    assert one.returncode == 2 and "two or more" in one.stderr


# ---- write_report: files and Prefect artifacts ---------------------------------------------------------


def stage(run_dir: Path, name: str, key: str, files: dict[str, str] | None = None, **manifest):
    from kdflow.store.outputs import building, existing_output, finish

    key = key.ljust(64, "0")
    with building(run_dir, name, key) as tmp:
        for file, text in (files or {}).items():
            (tmp / file).write_text(text)
        finish(tmp, name, key, inputs={}, **manifest)
    return existing_output(run_dir, name, key)


def curation_output(run_dir: Path):
    """A curate output whose files hold CURATION's rows (8 kept, 2 dropped as wrong answers) and whose manifest's
    figures were edited by hand (the ninth audit's #29): the output's sha256 covers the files, not those figures."""
    import pandas as pd

    from kdflow.store.outputs import building, existing_output, finish

    key = "f".ljust(64, "0")
    with building(run_dir, "curate", key) as tmp:
        pd.DataFrame({"id": [f"q{i}" for i in range(8)], "text": "x"}).to_parquet(tmp / "kept.parquet")
        reasons = {"id": ["q8", "q9"], "text": "x", "reasons": [["wrong_answer"], ["wrong_answer"]]}
        pd.DataFrame(reasons).to_parquet(tmp / "dropped.parquet")
        finish(tmp, "curate", key, inputs={}, input_rows=80, kept=30, dropped=50, drop_reasons={"wrong_answer": 50})
    return existing_output(run_dir, "curate", key)


def test_write_report_writes_files_and_artifacts(prefect_server, tmp_path):
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from kdflow.config.evaluation import EvaluationSection
    from tasks.evaluate import run_lm_eval
    from tasks.report import write_report

    run_dir = tmp_path / "runs" / "Report_Test"
    planted = planted_report()
    history = json.dumps(
        [{"loss": 3.0 / s, "step": s} for s in range(1, 20)] + [{"train_loss": 1.0, "train_runtime": 1}]
    )
    models = {
        "teacher": stage(run_dir, "teacher", "a", {"log_history.json": history}),
        "baseline": stage(run_dir, "students", "b", {"log_history.json": history}),
        "seq-kd": stage(run_dir, "students", "c"),
    }  # no log history: left out of the loss plot
    metrics = {"teacher": planted["teacher"], **planted["students"]}
    evaluations = {
        n: stage(run_dir, "evaluate", f"e{i}", {"metrics.json": json.dumps(metrics[n])}, metrics=metrics[n])
        for i, n in enumerate(models)
    }
    figures = {
        n: {
            k: metrics[n][k]
            for k in (
                "params",
                "flops_per_token",
                "size_bytes",
                "peak_memory_bytes",
                "latency_ms_per_token",
                "throughput_tokens_per_s",
                "context",
            )
        }
        for n in models
    }
    deployment = stage(run_dir, "deployment", "d", figures=figures, **DEPLOYMENT)
    curated = curation_output(run_dir)

    @flow
    def report_only():
        lm_eval = run_lm_eval(run_dir, models, EvaluationSection.LmEval(enabled=True))
        return write_report(
            run_dir,
            "Report_Test",
            models,
            evaluations,
            deployment,
            lm_eval,
            {"baseline": {"data": "gold"}, "seq-kd": {"data": "teacher"}},
            curated,
        )

    report = report_only()
    assert json.loads((run_dir / "report.json").read_text()) == report
    assert report["curation"] == CURATION  # the files' counts, not the hand-edited manifest's
    assert report["students"]["seq-kd"]["gap_closure"] == pytest.approx(0.75)
    # lm-eval is not installed here, and there is no GPU: a skip with its reason, not an error
    assert report["lm_eval"]["status"] == "skipped" and report["lm_eval"]["reason"]
    md = (run_dir / "report.md").read_text()
    assert "lm-evaluation-harness: **skipped**" in md
    for png in ("report-loss.png", "report-tradeoff.png"):
        assert (run_dir / png).read_bytes().startswith(b"\x89PNG") and f"]({png})" in md
    assert report["plots"] == ["report-loss.png", "report-tradeoff.png"]

    async def artifacts():
        async with get_client() as client:
            keys = ["report-test-report", "report-test-table"]
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))

    found = {a.key: a for a in asyncio.run(artifacts())}
    assert set(found) == {"report-test-report", "report-test-table"}
    assert "kdflow report: Report_Test" in found["report-test-report"].data
    assert "data:image/png;base64," in found["report-test-report"].data  # plots embedded in the artifact
    table = found["report-test-table"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [row["model"] for row in table] == ["teacher", "baseline", "seq-kd"]


def test_seeds_give_mean_and_spread_and_each_student_meets_its_own_seeds_baseline():
    from kdflow.reporting.run_report import render_markdown

    kd = {"kd": "offline", "divergence": "forward_kl", "alpha": 0.5, "temperature": 2.0}
    students = {}
    for seed, (base, seq, logit) in enumerate([(0.10, 0.80, 0.90), (0.20, 0.70, 0.80), (0.30, 0.90, 0.70)]):
        students[f"baseline@{seed}"] = model(base, 100, data="gold", seed=seed)
        students[f"seq-kd@{seed}"] = model(seq, 100, data="teacher", seed=seed)
        students[f"logit@{seed}"] = model(logit, 100, data="teacher", seed=seed, **kd)
    r = build_report("demo", model(1.0, 1000), students, CURATION, DEPLOYMENT)
    # per seed, against that seed's baseline: (0.7 − 0.2) / (1 − 0.2) for seq-kd@1
    assert r["students"]["seq-kd@1"]["gap_closure"] == pytest.approx(0.625)
    g = r["seeds"]["seq-kd"]
    assert g["seeds"] == [0, 1, 2] and g["accuracy_mean"] == pytest.approx(0.8)
    assert g["accuracy_std"] == pytest.approx(0.1) and (g["accuracy_min"], g["accuracy_max"]) == (0.7, 0.9)
    assert g["gap_closure_of_means"] == pytest.approx((0.8 - 0.2) / (1.0 - 0.2))
    assert r["seeds"]["logit"]["trained_on"] == "teacher + offline forward_kl (α 0.5, T 2)"
    md = render_markdown(r)
    assert "## Over seeds" in md and "| seq-kd | teacher | 0, 1, 2 | 0.800 ± 0.100 | 0.700 – 0.900 | 0.75 |" in md
    assert "**seq-kd@1** (trained on teacher): accuracy 0.700" in md and "closes 62% of the gap over `baseline@1`" in md
    # one seed: no seeds section
    assert build_report("demo", model(1.0, 1000), {"a": model(0.5, 10, data="gold")}, CURATION)["seeds"] == {}


def test_gap_closed_from_the_pruned_floor_on_every_metric_whichever_way_it_improves():
    """(student − floor) / (teacher − floor): ROUGE-L and agreement improve upwards, KL and log perplexity downwards;
    the floor itself has no row, and a report without a floor has no table."""
    teacher = {
        "rouge_l": 20.0,
        "params": 1000,
        "rows": 3,
        "split": "test",
        "agreement": 1.0,
        "kl": 0.0,
        "nll_per_token": 1.0,
    }
    floor = {
        "rouge_l": 2.0,
        "params": 600,
        "agreement": 0.2,
        "kl": 4.0,
        "nll_per_token": 5.0,
        "data": "none",
        "untrained": True,
    }
    student = {"rouge_l": 11.0, "params": 600, "agreement": 0.6, "kl": 1.0, "nll_per_token": 2.0, "data": "teacher"}
    r = build_report("real", teacher, {"pruned-15-importance": floor, "seq-kd": student}, CURATION)
    f = r["floor_gaps"]
    assert f["floor"] == "pruned-15-importance" and list(f["closed"]) == ["seq-kd"]
    assert f["closed"]["seq-kd"] == pytest.approx({"rouge_l": 0.5, "kl": 0.75, "agreement": 0.5, "nll_per_token": 0.75})
    page = render_markdown(r)
    assert "| seq-kd | 0.50 | 0.75 | 0.50 | 0.75 |" in page and "untrained `pruned-15-importance`" in page
    assert planted_report()["floor_gaps"] is None and "untrained" not in render_markdown(planted_report())


def test_the_teacher_row_says_a_gguf_teacher_is_the_dequantized_file(tmp_path):
    from kdflow.store.outputs import OutputRef
    from tasks.report import origin

    def ref(manifest: dict) -> OutputRef:
        folder = tmp_path / manifest["stage"] / str(len(list(tmp_path.rglob("manifest.json"))))
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return OutputRef(stage=manifest["stage"], key="k", path=str(folder), sha256="s")

    gguf = ref(
        {
            "stage": "import-gguf",
            "dequantized": True,
            "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "model_name": "SmolLM2",
            "architecture": "llama",
            "quantization": "Q4_1",
            "dtype": "float32",
        }
    )
    assert origin(gguf) == {
        "origin": "given: SmolLM2-135M-Instruct.Q4_1.gguf (SmolLM2, Q4_1 GGUF), dequantized to float32"
    }
    assert origin(ref({"stage": "teacher", "given": "/models/qwen"})) == {"origin": "given: /models/qwen"}
    assert origin(ref({"stage": "teacher", "params": 1000})) == {}  # trained here: the report says gold
    r = build_report("x", {**model(0.9, 1000), **origin(gguf)}, {"s": {**model(0.5, 100), "data": "gold"}}, CURATION)
    assert "| teacher | given: SmolLM2-135M-Instruct.Q4_1.gguf" in render_markdown(r)


def test_a_report_artifact_the_prefect_api_cannot_take_is_logged_not_raised(caplog):
    # The Prefect server gone mid-run made the report stage fail on its artifact after report.md was written (audit,
    # issue 23): the artifact is a view of files already on disk.
    import httpx

    from tasks.report import publish

    def refused(**artifact):
        raise httpx.ConnectError("All connection attempts failed")

    taken = {}
    with caplog.at_level("WARNING", logger="kdflow.report"):
        assert publish(refused, key="demo-report", markdown="# report") is False
        assert publish(lambda **artifact: taken.update(artifact), key="demo-table", table=[{"model": "teacher"}])
    assert "'demo-report' not published (ConnectError" in caplog.text and "in the run folder" in caplog.text
    assert taken == {"key": "demo-table", "table": [{"model": "teacher"}]}


def test_the_preflight_section_lists_every_check_of_every_teacher_and_none_when_none_ran():
    from kdflow.reporting.preflight_report import preflight_markdown, preflight_summary

    def found(*checks):
        return {
            "passed": all(s != "failed" for _, s, _ in checks),
            "counts": {s: sum(c[1] == s for c in checks) for s in ("passed", "failed", "skipped")},
            "checks": [{"name": n, "status": s, "detail": d, "fix": None, "figures": {}} for n, s, d in checks],
        }

    reports = {
        "add": found(("repeatable[generation: hf]", "passed", "3 identical answers")),
        "sub": found(("backends_agree", "skipped", "HF alone | nothing to compare")),
    }
    md = preflight_markdown(reports)
    assert "| add | repeatable[generation: hf] | passed | 3 identical answers |" in md
    assert "| sub | backends_agree | skipped | HF alone \\| nothing to compare |" in md  # a | in a cell is escaped
    assert preflight_summary(reports)["sub"]["counts"] == {"passed": 0, "failed": 0, "skipped": 1}
    assert preflight_markdown(None) == preflight_markdown({}) == "" and preflight_summary({}) is None


def test_the_report_names_the_logit_dataset_the_students_read():
    files = [{"file": f"/data/kd/data_{i}.parquet", "sha256": f"{i}" * 64} for i in range(5)]
    imported = {"source": "import:axolotl", "rows": 40, "k": 8, "teachers": ["qwen-7b"], "files": files}
    md = render_markdown({**planted_report(), "logit_cache": {**imported, "named_teacher": True}})
    assert (
        "Logit cache: imported from axolotl files `/data/kd/data_0.parquet` (sha256 000000000000…), "
        "`/data/kd/data_1.parquet` (sha256 111111111111…), `/data/kd/data_2.parquet` (sha256 222222222222…) and 2 "
        "more, recorded as teacher `qwen-7b`: 40 rows, top-8." in md
    )
    unnamed = {**imported, "files": files[:1], "teachers": ["axolotl:/data/kd/data_0.parquet"], "named_teacher": False}
    assert "(sha256 000000000000…): 40 rows, top-8." in render_markdown({**planted_report(), "logit_cache": unnamed})
    captured = {
        "source": "hf",
        "rows": 12,
        "k": 20,
        "teachers": ["runs/x/teacher"],
        "files": [],
        "named_teacher": False,
    }
    md = render_markdown({**planted_report(), "logit_cache": captured})
    assert "Logit cache: the teacher's top-20 log-probs on 12 rows, captured here (hf)." in md
    assert "Logit cache" not in render_markdown(planted_report())  # no student read one


def test_a_gold_student_started_from_a_kd_student_is_nobodys_baseline():
    # The sixth audit: `chain` (data: gold, init: {from: student, student: logit-kd}) was shown as "0 (baseline)", and
    # listed first it became the baseline every other student was measured against.
    kd = {"kd": "offline", "divergence": "forward_kl", "alpha": 0.5, "temperature": 1.0}
    chain = model(0.6, 100, data="gold", init="from the trained student logit-kd", starts_from="logit-kd")
    students = {
        "logit-kd": model(0.5, 100, data="teacher", **kd),
        "chain": chain,
        "baseline": model(0.1, 100, data="gold"),
    }
    r = build_report("demo", model(0.9, 1000), students, CURATION, DEPLOYMENT)
    assert r["gap_closure"]["baseline"] == "baseline"
    assert r["students"]["logit-kd"]["gap_closure"] == pytest.approx(0.5)
    assert r["students"]["chain"]["gap_closure"] == pytest.approx(0.625)


def test_each_student_is_measured_against_the_baseline_of_its_own_start_and_only_that_one_says_so():
    # The seventh audit: a pruned student trained on gold, listed first, became everyone's baseline (a fresh KD student
    # then closed 0.25 instead of 0.625); a second gold student, and one on half the data, showed "0 (baseline)"
    # while report.json measured them against another; the half-data one, listed first, became the baseline.
    from kdflow.reporting.run_report import render_markdown

    kd = {"kd": "offline", "divergence": "forward_kl", "alpha": 0.5, "temperature": 1.0}
    pruned = {"data": "gold", "init": "pruned from the teacher: 1 layers, every_other"}
    students = {
        "pruned": model(0.70, 50, **pruned),
        "gold-half": model(0.30, 100, data="gold", data_fraction=0.5),
        "kd": model(0.75, 100, data="teacher", **kd),
        "pruned-kd": model(0.80, 50, **{**pruned, "data": "teacher"}, **kd),
        "baseline": model(0.50, 100, data="gold"),
        "big-gold": model(0.70, 200, data="gold"),
    }
    r = build_report("demo", model(0.9, 1000), students, CURATION, DEPLOYMENT)
    s = r["students"]
    assert s["kd"]["gap_baseline"] == "baseline" and s["kd"]["gap_closure"] == pytest.approx(0.625)
    assert s["pruned-kd"]["gap_baseline"] == "pruned" and s["pruned-kd"]["gap_closure"] == pytest.approx(0.5)
    assert s["gold-half"]["gap_baseline"] == "baseline" and s["big-gold"]["gap_closure"] == pytest.approx(0.5)
    md = render_markdown(r)
    quality = md.split("## Quality")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in quality.splitlines() if line.startswith("| ")}
    assert "0 (baseline)" in rows["baseline"] and "0 (baseline)" in rows["pruned"]
    assert "0 (baseline)" not in rows["big-gold"] and "| 0.50 |" in rows["big-gold"]
    assert "0 (baseline)" not in rows["gold-half"]


def test_a_baseline_has_the_students_starting_weights_and_is_preferably_trained_like_it(tmp_path):
    # The eighth audit: every fresh architecture and every pretrained model had the same start in the record (no
    # `init`), so a big KD student was measured against the small gold baseline listed first, and one fine-tuned from
    # a pretrained model against a fresh one; a LoRA or 2-step gold student listed first was everyone's baseline.
    from kdflow.config.student import StudentSection
    from kdflow.training.tiny_models import llama_model, train_tokenizer

    folder = tmp_path / "pretrained"
    tokenizer = train_tokenizer(["1+1=2", "2+2=4"] * 5, vocab_size=40)
    llama_model(tokenizer, hidden=16, layers=1, heads=1, intermediate=32, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    small, big = (
        {"hidden": 32, "layers": 1, "heads": 1, "intermediate": 64},
        {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128},
    )
    steps = {"max_steps": 10}
    kd = {"method": "offline", "divergence": "forward_kl"}

    def record(accuracy: float, **section) -> dict:
        s = StudentSection(name="x", training=section.pop("training", steps), **section)
        return model(accuracy, 100, **s.summary())

    students = {
        "base-small": record(0.50, data="gold", architecture=small),
        "base-big": record(0.70, data="gold", architecture=big),
        "kd-small": record(0.60, data="teacher", architecture=small, kd=kd),
        "kd-big": record(0.80, data="teacher", architecture=big, kd=kd),
        "kd-pretrained": record(0.60, data="teacher", model=str(folder), kd=kd),
    }
    s = build_report("demo", model(0.9, 1000), students, CURATION, DEPLOYMENT)["students"]
    assert s["kd-small"]["gap_baseline"] == "base-small" and s["kd-small"]["gap_closure"] == pytest.approx(0.25)
    assert s["kd-big"]["gap_baseline"] == "base-big" and s["kd-big"]["gap_closure"] == pytest.approx(0.5)
    assert s["kd-pretrained"]["gap_baseline"] is None and s["kd-pretrained"]["gap_closure"] is None  # none of its start

    # The ninth audit: a fresh student's seed draws its starting weights, so a seed-1 KD student was measured against
    # the seed-0 gold baseline listed first; it is measured against the seed-1 one, and with none, against nobody.
    seeded = {
        "base-0": record(0.50, data="gold", architecture=small),
        "base-1": record(0.40, data="gold", architecture=small, seed=1),
        "kd-1": record(0.60, data="teacher", architecture=small, kd=kd, seed=1),
        "kd-2": record(0.60, data="teacher", architecture=small, kd=kd, seed=2),
    }
    s = build_report("demo", model(0.9, 1000), seeded, CURATION, DEPLOYMENT)["students"]
    assert s["kd-1"]["gap_baseline"] == "base-1" and s["kd-1"]["gap_closure"] == pytest.approx(0.4)
    assert s["kd-2"]["gap_baseline"] is None and s["kd-2"]["gap_closure"] is None

    tuned = {
        "gold-lora": record(0.30, data="gold", model=str(folder), lora={"r": 4}),
        "gold-2-steps": record(0.20, data="gold", model=str(folder), training={"max_steps": 2}),
        "gold": record(0.50, data="gold", model=str(folder)),
        "kd": record(0.60, data="teacher", model=str(folder), kd=kd),
        "kd-lora": record(0.40, data="teacher", model=str(folder), lora={"r": 4}, kd=kd),
    }
    s = build_report("demo", model(0.9, 1000), tuned, CURATION, DEPLOYMENT)["students"]
    assert s["kd"]["gap_baseline"] == "gold" and s["kd"]["gap_closure"] == pytest.approx(0.25)
    assert s["kd-lora"]["gap_baseline"] == "gold-lora" and s["kd-lora"]["gap_closure"] == pytest.approx(1 / 6)

    # The ninth audit's #36: a bfloat16 KD student was measured against the float32 gold baseline listed first
    precise = {
        "gold": record(0.50, data="gold", model=str(folder)),
        "gold-bf16": record(0.30, data="gold", model=str(folder), dtype="bfloat16"),
        "kd-bf16": record(0.60, data="teacher", model=str(folder), kd=kd, dtype="bfloat16"),
    }
    s = build_report("demo", model(0.9, 1000), precise, CURATION, DEPLOYMENT)["students"]
    assert s["kd-bf16"]["gap_baseline"] == "gold-bf16" and s["kd-bf16"]["gap_closure"] == pytest.approx(0.5)


def test_the_report_reads_an_evaluations_figures_from_its_checked_file_not_the_manifest(tmp_path):
    # The eighth audit: the report read `metrics` from manifest.json, which no hash covers, so a hand-edited manifest
    # (accuracy 0.2 → 0.97) was reported as measured. metrics.json is covered by the manifest's sha256.
    from kdflow.evaluation.model_metrics import read_metrics
    from kdflow.store.outputs import MANIFEST, building, existing_output, finish

    key = "evaluate".ljust(64, "0")
    with building(tmp_path, "evaluate", key) as tmp:
        (tmp / "metrics.json").write_text(json.dumps({"accuracy": 0.2}))
        finish(tmp, "evaluate", key, inputs={}, metrics={"accuracy": 0.2})
    ref = existing_output(tmp_path, "evaluate", key)
    manifest = Path(ref.path) / MANIFEST
    assert read_metrics(ref.path)["accuracy"] == 0.2  # the report's figure is the checked file's
    (Path(ref.path) / "metrics.json").write_text(json.dumps({"accuracy": 0.97}))
    assert existing_output(tmp_path, "evaluate", key) is None  # an edited metrics.json: set aside, made again

    with building(tmp_path, "evaluate", key) as tmp:
        (tmp / "metrics.json").write_text(json.dumps({"accuracy": 0.2}))
        finish(tmp, "evaluate", key, inputs={}, metrics={"accuracy": 0.2})
    manifest.write_text(manifest.read_text().replace('"accuracy": 0.2', '"accuracy": 0.97'))
    assert existing_output(tmp_path, "evaluate", key) is None  # so is an edited manifest: it hashes itself
