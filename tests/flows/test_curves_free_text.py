"""Learning curves on instruction data (issue 24): the curves flow on tests/instructions_mini.yaml, a tiny local teacher
on the real T0 / Self-Instruct files, students pruned from it and one started from another student — each snapshot
scored by ROUGE-L with the evaluate stage's own scorer, the teacher's ROUGE-L as the reference line, the report naming
the metric. Real Prefect, real training; no timing assertions."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdflow.config.loading import RecipeError
from kdflow.config.recipe import load_recipe
from kdflow.config.study import load_study

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 2-layer Llama, untrained, whose BPE knows the data files' characters (one of arithmetic reads them as unk)."""
    from kdflow.training.tiny_models import llama_model, train_tokenizer

    files = ("data/t0-short/prompts.jsonl", "data/self-instruct/user_oriented_instructions.jsonl")
    text = [line for f in files for line in (ROOT / f).read_text().splitlines()[:300]]
    tokenizer = train_tokenizer(text, vocab_size=400)
    model = llama_model(tokenizer, hidden=64, layers=2, heads=2, intermediate=128, seed=0, max_positions=4096)
    # A random model whose head is its embedding repeats the last prompt token, the chat template's <|assistant|>,
    # which decodes to nothing: every answer would be dropped as empty. A head of its own answers in text.
    model.config.tie_word_embeddings = False
    torch.manual_seed(1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.02)
    folder = tmp_path_factory.mktemp("instructions-teacher")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def recipe(tmp_path, tiny_teacher) -> Path:
    text = (ROOT / "tests" / "instructions_mini.yaml").read_text()
    text = text.replace("root: runs", f"root: {tmp_path / 'runs'}").replace("TINY_TEACHER", str(tiny_teacher))
    path = tmp_path / "instructions_mini.yaml"
    path.write_text(text)
    return path


def study(tmp_path: Path, recipe: Path, **fields) -> Path:
    path = tmp_path / "study-free-text.yaml"
    fields = {"recipe": str(recipe), "students": ["sft", "seq-kd", "seq-kd-more"], "seeds": [0, 1], **fields}
    path.write_text(yaml.safe_dump({**fields, "curve_points": 2, "reference": "seq-kd"}, sort_keys=False))
    return path


def test_an_arm_started_from_another_student_needs_that_student_before_it(tmp_path, recipe):
    s = load_study(study(tmp_path, recipe))
    runs = {r.name: r for r in s.runs(load_recipe(s.recipe_path()))}
    assert runs["seq-kd-more@1"].init.student == "seq-kd@1"  # the same seed's run
    with pytest.raises(RecipeError, match="add 'seq-kd' to the study's students, before 'seq-kd-more'"):
        load_study(study(tmp_path, recipe, students=["seq-kd-more", "seq-kd"]))


@pytest.mark.slow
def test_learning_curves_on_instruction_data_are_rouge_l(prefect_server, tmp_path, recipe):
    from flows.learning_curves import learning_curves
    from flows.lookups import run_teacher
    from kdflow.evaluation.curves import CURVE_FILE
    from kdflow.store import run_folder
    from tasks.evaluate import evaluate_model

    path = study(tmp_path, recipe)
    summary = learning_curves(str(path))

    assert summary["metric"] == "rouge_l" and "teacher_accuracy" not in summary
    assert set(summary["arms"]) == {"sft", "seq-kd", "seq-kd-more"}
    assert list(summary["arms"]["seq-kd"]) == [2, 4] and list(summary["arms"]["seq-kd-more"]) == [6, 8]  # 4 + (2, 4)
    assert all(
        c["seeds"] == 2 and 0.0 <= c["mean"] <= 100.0 for curve in summary["arms"].values() for c in curve.values()
    )
    r = load_recipe(recipe)
    run = r.run_dir
    [teacher_eval] = run_folder.outputs(run, "evaluate")  # the teacher's, the distill flow's stage output
    teacher_metrics = teacher_eval.manifest()["metrics"]
    assert summary["teacher_rouge_l"] == teacher_metrics["rouge_l"] and "accuracy" not in teacher_metrics

    # each snapshot's figure is the evaluate stage's: the final point of a student against its own evaluation
    curves = {}
    for out in run_folder.outputs(run, "curves"):
        curves[out.manifest()["name"]] = json.loads((Path(out.path) / CURVE_FILE).read_text())
    assert len(curves) == 6
    assert all("rouge_l" in p and "accuracy" not in p for c in curves.values() for p in c["points"])
    [student] = [ref for ref in run_folder.outputs(run, "students") if ref.manifest()["name"] == "seq-kd@0"]
    teacher, data = run_teacher(run, r), run_folder.latest(run, "data")
    evaluated = evaluate_model.fn(
        run, r.evaluation, r.prompts.cot_text(), r.data.source, student, teacher, data, teacher_eval
    )
    assert curves["seq-kd@0"]["points"][-1]["rouge_l"] == pytest.approx(evaluated.manifest()["metrics"]["rouge_l"])

    out = run / "studies" / path.stem
    md = (out / "curves.md").read_text()
    assert f"Teacher ROUGE-L: {teacher_metrics['rouge_l']:.1f}. Cells: test ROUGE-L" in md
    assert "accuracy" not in md and "| 2 |" in md
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "curves.json").read_text())
    assert saved["curves"]["seq-kd-more@0"][0]["seconds"] > saved["curves"]["seq-kd@0"][-1]["seconds"]
