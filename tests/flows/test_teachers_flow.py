"""Two routed teachers end to end (issue 26, part 2): the distill flow on tiny models, with real Prefect. Each teacher
is trained on its own rows and answers only the rows routed to it; the student reads one logit cache, each row of it
its routed teacher's; the report shows each teacher's figures and token shares."""

import json
from pathlib import Path

import pandas as pd
import pytest

from kdflow.config.recipe import load_recipe
from kdflow.curation.pipeline import KEPT
from kdflow.logit_cache.reader import LogitCache
from kdflow.store.model_folders import model_location
from kdflow.store.outputs import existing_output
from kdflow.store.run_folder import read_split
from kdflow.teacher.generation import ANSWERS
from kdflow.teacher.routing import TEACHER_COLUMN
from tests.conftest import assert_rerun_report
from tests.teacher.test_teachers import two_teachers, with_logit_student

pytestmark = pytest.mark.slow


def outputs(run_dir: Path, stage: str) -> list:
    return [existing_output(run_dir, stage, p.name) for p in (run_dir / stage).iterdir() if not p.name.startswith(".")]


def test_two_routed_teachers_distil_one_student(prefect_server, mini_recipe):
    from flows.distill import distill

    text = with_logit_student(two_teachers(mini_recipe.read_text())).replace("max_steps: 5}", "max_steps: 30}")
    # every answer kept, right or wrong: each teacher then has rows in the cache whatever 30 steps taught it
    text = text.replace("students:", "filters: {correctness: false, truncated: false, empty: false}\n\nstudents:", 1)
    mini_recipe.write_text(text)
    r = load_recipe(mini_recipe)
    report = distill(str(mini_recipe))
    run_dir = r.run_dir

    # Each teacher trained on its own rows (add: the chains without '-'), with the one tokenizer learnt from all rows.
    teachers = {o.manifest()["inputs"].get("train_on") is not None: o for o in outputs(run_dir, "teacher")}
    assert set(teachers) == {True, False}
    data = outputs(run_dir, "data")[0]
    no_minus = sum("-" not in row["question"] for row in read_split(data, "teacher"))
    assert teachers[True].manifest()["rows"] == no_minus < teachers[False].manifest()["rows"] == 200
    tokenizers = {(Path(model_location(o)) / "tokenizer.json").read_text() for o in teachers.values()}
    assert len(tokenizers) == 1

    # Every answer written by the teacher its row is routed to, every row answered once.
    joined = outputs(run_dir, "generate-routed")[0]
    answers = pd.read_parquet(Path(joined.path) / ANSWERS)
    assert len(answers) == 80 and answers["id"].is_unique  # train 40 + prompts 40
    for row in answers.to_dict("records"):
        assert row[TEACHER_COLUMN] == r.routing.teacher_of(row), row
    assert set(answers[TEACHER_COLUMN]) == {"add", "sub"}

    # The student's cache: each kept row exactly as its routed teacher's own cache holds it.
    cache = LogitCache.open(Path(outputs(run_dir, "logit-cache-routed")[0].path))
    kept = pd.read_parquet(Path(outputs(run_dir, "curate")[0].path) / KEPT)
    assert len(cache.row_ids) == len(kept)
    parts = {
        o.manifest()["inputs"]["routed_to"]: LogitCache.open(Path(o.path)) for o in outputs(run_dir, "logit-cache")
    }
    for row in kept.to_dict("records"):
        row_id = f"{row['id']}/{row['sample']}"
        mine, got = parts[row[TEACHER_COLUMN]][row_id], cache[row_id]
        assert got.ids.equal(mine.ids) and got.logprobs.equal(mine.logprobs) and got.tail.equal(mine.tail)

    # The report: each teacher's figures on its rows, its token shares; the student measured against the routed pair.
    t = report["teachers"]
    assert set(t["by_teacher"]) == {"add", "sub"}
    assert sum(x["test_rows"] for x in t["by_teacher"].values()) == 30
    for share in ("answer_token_share", "logit_token_share"):
        assert sum(x[share] for x in t["by_teacher"].values()) == pytest.approx(1.0, abs=1e-3)
    assert report["teacher"]["accuracy"] == t["routed_accuracy"]
    assert {"baseline", "seq-kd"} <= set(report["students"])
    assert "## Teachers" in (run_dir / "report.md").read_text()
    assert json.loads((run_dir / "report.json").read_text())["teachers"] == t
    assert set(report["preflight"]) == {"add", "sub"} and all(p["passed"] for p in report["preflight"].values())

    # `kdflow evaluate` alone finds each teacher's outputs by its key (not the newest of each stage) and writes the
    # distill flow's report again: the teachers' section, both preflights and the joined cache included.
    from flows.curate import curate
    from flows.evaluate import evaluate
    from flows.generate import generate

    assert_rerun_report(evaluate(str(mini_recipe)), report)
    # `kdflow generate` and `kdflow curate` alone: each teacher answers its own rows, joined, as in the distill flow
    # (the ninth audit: the default teacher alone answered every row); here the distill flow's outputs, reused
    assert Path(generate(str(mini_recipe)).path) == Path(joined.path)
    assert Path(curate(str(mini_recipe)).path) == Path(outputs(run_dir, "curate")[0].path)
    # `kdflow logit-cache` alone: the joined cache, and its summary line (the tenth audit: a KeyError after the work)
    from flows.capture_logits import capture_logits_flow

    assert Path(capture_logits_flow(str(mini_recipe)).path) == Path(outputs(run_dir, "logit-cache-routed")[0].path)


def test_routed_scorer_with_two_real_teacher_processes(tmp_path):
    """Two tiny teachers (one tokenizer, other weights) in their own scoring processes: each row's routed answer is
    the one its teacher gives alone."""
    import numpy as np
    from transformers import AutoTokenizer

    from kdflow.logit_cache.scoring import HFScorer, RoutedScorer
    from kdflow.logit_cache.topk import EncodedRow
    from kdflow.training.tiny_models import llama_model
    from tests.conftest import build_tiny_teacher

    a = build_tiny_teacher(tmp_path / "a")
    b = tmp_path / "b"
    tok = AutoTokenizer.from_pretrained(a)
    llama_model(tok, hidden=64, layers=1, heads=2, intermediate=128, seed=1, max_positions=1024).save_pretrained(b)
    tok.save_pretrained(b)
    rng = np.random.default_rng(0)
    rows = [EncodedRow(f"r{i}", rng.integers(3, len(tok), int(rng.integers(6, 12))), 2) for i in range(6)]
    route = lambda row: "a" if int(row.row_id[1:]) % 2 else "b"  # noqa: E731
    scorers = {n: HFScorer(folder, 4, tmp_path / f"{n}.log", threads=1) for n, folder in (("a", a), ("b", b))}
    try:
        alone = {n: s.score(rows) for n, s in scorers.items()}
        routed = RoutedScorer(scorers, route).score(rows)
    finally:
        RoutedScorer(scorers, route).close()
    for i, row in enumerate(rows):
        want = alone[route(row)][i]
        assert np.array_equal(routed[i].ids, want.ids) and np.allclose(routed[i].logprobs, want.logprobs, atol=0)
    assert not np.array_equal(alone["a"][0].logprobs, alone["b"][0].logprobs)  # the teachers differ


def test_an_on_policy_student_has_each_sample_scored_by_its_rows_teacher(prefect_server, mini_recipe):
    """On-policy KD with two routed teachers through the distill flow: each teacher scores the student's samples of
    the rows routed to it. Each step's batch holds every kept row, so in 2 steps each row is sampled twice: each
    teacher scored exactly twice the kept rows the generate stage recorded as its own."""
    from flows.distill import distill

    student = (
        "  - name: seq-kd\n    data: teacher\n    kd: {method: on_policy, k: 4, max_new_tokens: 8}\n"
        "    architecture: {hidden: 32, layers: 1, heads: 1, intermediate: 64}\n"
        "    training: {max_steps: 2, per_device_train_batch_size: 128, learning_rate: 3.0e-3, logging_steps: 1}\n"
    )
    text = two_teachers(mini_recipe.read_text())
    text = text[: text.index("students:\n")] + "students:\n" + student + "\n" + text[text.index("evaluation:") :]
    # every answer kept, right or wrong: each teacher then has rows whatever its 5 steps taught it
    text = text.replace("students:", "filters: {correctness: false, truncated: false, empty: false}\n\nstudents:", 1)
    mini_recipe.write_text(text)
    r = load_recipe(mini_recipe)
    report = distill(str(mini_recipe))
    run_dir = r.run_dir

    kept = pd.read_parquet(Path(outputs(run_dir, "curate")[0].path) / KEPT)
    mine = kept[TEACHER_COLUMN].value_counts().to_dict()
    assert set(mine) == {"add", "sub"} and sum(mine.values()) == len(kept) <= 128

    [op] = outputs(run_dir, "students")
    m = op.manifest()
    assert set(m["inputs"]["teachers"]) == {"add", "sub"} and m["inputs"]["routing"]["default"] == "sub"
    scored = m["on_policy"]["by_teacher"]
    assert {name: n["samples"] for name, n in scored.items()} == {name: 2 * n for name, n in mine.items()}
    assert sum(n["tokens"] for n in scored.values()) == m["on_policy"]["teacher_tokens_scored"]
    assert m["on_policy"]["teacher_tokens_scored"] == m["on_policy"]["student_tokens_sampled"] > 0
    assert sum(n["token_share"] for n in scored.values()) == pytest.approx(1.0, abs=1e-3)
    # the top-k diagnostics, logged at each step from the parts both teachers scored
    assert m["topk"]["logging_steps"] == 2 and 0 < m["topk"]["mean"]["topk_kept_mass"] <= 1
    assert m["topk"]["mean"]["top1_outside_topk"] >= 0

    # The report: the teachers' section stands (no logit cache: no logit positions), the student trained on-policy.
    t = report["teachers"]
    assert set(t["by_teacher"]) == {"add", "sub"}
    assert sum(x["answer_token_share"] for x in t["by_teacher"].values()) == pytest.approx(1.0, abs=1e-3)
    assert all(x["logit_token_share"] is None for x in t["by_teacher"].values())
    assert report["students"]["seq-kd"]["on_policy"]["on_policy_batches"] == 2
    md = (run_dir / "report.md").read_text()
    assert "## On-policy training" in md
    shares = ", ".join(
        f"{name} {100 * n['token_share']:.1f} % ({n['tokens']:,} tokens of {n['samples']:,} samples)"
        for name, n in scored.items()
    )
    assert f"On-policy student seq-kd: its samples scored by {shares}." in md  # each teacher's share of the scoring

    # `kdflow evaluate` alone finds the on-policy student under its key, which holds both teachers
    from flows.evaluate import evaluate

    assert_rerun_report(evaluate(str(mini_recipe)), report)

    # `kdflow students --run-dir <a copy>`: the routed teachers are found in the copy by their keys, as every other
    # input (the tenth audit: refused, "looked up in the recipe's run folder"); the student is the one trained above
    import os
    import shutil

    from flows.train_students import train_students

    copy = run_dir.parent / "copy"
    shutil.copytree(run_dir, copy, copy_function=os.link)
    assert train_students(str(mini_recipe), run_dir=str(copy))["seq-kd"].sha256 == op.sha256
    assert len(outputs(copy, "students")) == 1  # nothing trained again
