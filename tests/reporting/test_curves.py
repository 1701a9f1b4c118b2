"""Learning curves (issue 15, item 4): snapshot steps, the snapshots a student saves while it trains (the very weights
it had at that step), the study recipe's checks, the curves report's verdicts and reach on planted curves, and the
study flow end to end on the miniature recipe (real Prefect), a warm-started arm included. No timing assertions."""

import json

import pytest
import torch
import yaml
from transformers import TrainerCallback

from kdflow.config.fields import ROOT
from kdflow.config.loading import RecipeError
from kdflow.config.recipe import load_recipe
from kdflow.config.study import load_study
from kdflow.config.training import trainer_config
from kdflow.reporting.curves import plot_curves, render, shifted, summarise, verdict_lines
from kdflow.reporting.sweep import beats
from kdflow.training.curves import CurveSnapshots, curve_steps, read_curve
from kdflow.training.sft import train_sft
from tests.logit_cache.test_capture import tiny_teacher
from tests.training.test_training_progress import TRAINING, rows, student

torch.set_num_threads(1)
ROOT_SWEEPS = ROOT / "recipes" / "sweeps"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("curves") / "teacher")[1]


def test_curve_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert curve_steps(1500, 5) == [300, 600, 900, 1200, 1500]
    assert curve_steps(1500, 6) == [250, 500, 750, 1000, 1250, 1500]
    assert curve_steps(10, 3) == [3, 7, 10]
    assert curve_steps(2, 5) == [1, 2]  # more points than steps: each step once
    with pytest.raises(ValueError, match="points >= 1"):
        curve_steps(10, 0)


class Remember(TrainerCallback):
    """The model's weights at ``step``, copied in memory, to compare the saved snapshot with."""

    def __init__(self, step):
        self.step, self.weights = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_student_saves_its_weights_at_each_curve_step(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    remember = Remember(3)
    training = {**TRAINING, "max_steps": 9}
    train_sft(
        student(tokenizer),
        tokenizer,
        rows(),
        trainer_config(training, out, 0),
        out,
        callbacks=[CurveSnapshots(out, 3, tokenizer), remember],
    )
    curve = read_curve(out)
    assert [p["step"] for p in curve["points"]] == [3, 6, 9] and curve["max_steps"] == 9
    assert [p["model"] for p in curve["points"]] == ["curve/step-3", "curve/step-6", "model"]
    seconds = [p["seconds"] for p in curve["points"]]
    assert seconds == sorted(seconds) and seconds[0] > 0 and curve["resumed_at"] is None
    saved = AutoModelForCausalLM.from_pretrained(out / "curve" / "step-3").state_dict()
    final = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(saved[k], remember.weights[k]) for k in saved)
    assert not all(torch.equal(saved[k], final[k]) for k in saved)  # training went on after the snapshot
    assert (out / "curve" / "step-6" / "tokenizer.json").is_file()  # each snapshot loads on its own


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 7:
            raise KeyboardInterrupt("killed at step 7")


def test_a_resumed_student_keeps_the_snapshots_and_the_clock_of_the_attempt_that_crashed(tokenizer, tmp_path):
    work, training = tmp_path / "work", {**TRAINING, "max_steps": 9}
    with pytest.raises(KeyboardInterrupt):
        train_sft(
            student(tokenizer),
            tokenizer,
            rows(),
            trainer_config(training, tmp_path / "first", 0, work),
            tmp_path / "first",
            callbacks=[CurveSnapshots(tmp_path / "first", 3, tokenizer, work), Crash()],
        )
    assert (work / "curve" / "step-3").is_dir() and (work / "checkpoint-6").is_dir()
    out = tmp_path / "second"  # a new temporary output folder, as a rerun of the stage builds
    train_sft(
        student(tokenizer),
        tokenizer,
        rows(),
        trainer_config(training, out, 0, work),
        out,
        callbacks=[CurveSnapshots(out, 3, tokenizer, work)],
    )
    curve = read_curve(out)
    assert [p["step"] for p in curve["points"]] == [3, 6, 9] and curve["resumed_at"] == 6
    seconds = [p["seconds"] for p in curve["points"]]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert (out / "curve" / "step-3" / "model.safetensors").is_file() and (out / "curve" / "step-6").is_dir()
    # the snapshots and the last checkpoint wait in the work folder until the stage's output is complete
    assert (work / "curve" / "step-3" / "model.safetensors").is_file() and (work / "checkpoint-9").is_dir()


def test_a_student_without_a_curve_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="curve_points: N"):
        read_curve(tmp_path)


def test_the_verdict_rule_is_the_sweeps():
    a, b = {"mean": 0.9, "sd": 0.02}, {"mean": 0.8, "sd": 0.03}
    assert beats(a, b)["verdict"] == "beats" and beats(b, a)["verdict"] == "loses"
    assert beats({"mean": 0.84, "sd": 0.02}, b)["verdict"] == "within"


def planted():
    def points(accuracies, per_step=10.0):
        return [{"step": 100 * (i + 1), "seconds": per_step * (i + 1), "accuracy": a} for i, a in enumerate(accuracies)]

    return {
        "seq-kd@0": points([0.1, 0.5, 0.9]),
        "seq-kd@1": points([0.2, 0.6, 0.92]),
        "seq-kd@2": points([0.0, 0.4, 0.88]),
        # fast: reaches seq-kd's final mean (0.90) at step 200, and beats it there beyond the spread
        "fast@0": points([0.3, 0.91, 0.95], 20.0),
        "fast@1": points([0.35, 0.92, 0.94], 20.0),
        "fast@2": points([0.4, 0.93, 0.96], 20.0),
        "slow@0": points([0.0, 0.1, 0.5]),
        "slow@1": points([0.0, 0.2, 0.6]),
        "slow@2": points([0.0, 0.0, 0.4]),
    }


def test_summary_verdicts_and_reach_on_planted_curves():
    s = summarise(planted(), "seq-kd", teacher=0.98)
    assert s["arms"]["seq-kd"][300]["mean"] == pytest.approx(0.9) and s["arms"]["seq-kd"][300]["sd"] == pytest.approx(
        0.02
    )
    assert s["arms"]["fast"][200]["seconds"] == pytest.approx(40.0)
    verdicts = {(v["arm"], v["step"]): v["verdict"] for v in s["verdicts"]}
    assert verdicts[("fast", 200)] == "beats" and verdicts[("slow", 300)] == "loses"
    assert verdicts[("fast", 100)] == "beats" and verdicts[("fast", 300)] == "beats"
    assert s["reach"]["fast"] == {"step": 200, "seconds": 40.0, "share_of_reference_steps": pytest.approx(2 / 3)}
    assert s["reach"]["slow"]["step"] is None
    lines = verdict_lines(s)
    assert "- At step 200, **fast beats seq-kd** by 0.420 (seed spread 0.110)." in lines
    assert any(
        line.startswith(
            "- fast reaches seq-kd's final accuracy (0.900) at step 200: 67% of seq-kd's 300 "
            "steps, 40 s of training (seq-kd: 30 s)"
        )
        for line in lines
    )
    assert any(line.startswith("- slow does not reach") for line in lines)
    md = render(s, "curves.png")
    assert "| 300 | 0.900 ± 0.020 (30 s) | 0.950 ± 0.010 (60 s) | 0.500 ± 0.100 (30 s) |" in md
    with pytest.raises(ValueError, match="reference arm 'nope'"):
        summarise(planted(), "nope")


def test_the_curves_metric_is_the_evaluate_stages_for_the_data():
    from data.checkers import answer_checker
    from kdflow.config.data import DataSource
    from kdflow.evaluation.curves import snapshot_quality
    from kdflow.reporting.quality_metric import quality_key, source_metric

    assert source_metric(DataSource.instructions) == "rouge_l"
    assert source_metric(DataSource.gsm8k) == source_metric(DataSource.arithmetic) == "accuracy"
    # what the report reads from a teacher's evaluation agrees with what the curves choose before any evaluation
    assert quality_key({"rouge_l": 13.9, "perplexity": 4.2}) == source_metric(DataSource.instructions)
    assert quality_key({"accuracy": 0.9}) == source_metric(DataSource.gsm8k)
    with pytest.raises(ValueError, match="no learning curve of 'bleu'"):
        snapshot_quality(None, None, [], "", "bleu", answer_checker(DataSource.gsm8k)[0], 8, 8)
    with pytest.raises(ValueError, match="no learning curve of 'bleu'"):
        summarise(planted(), "seq-kd", metric="bleu")


def test_a_snapshot_on_instruction_data_is_scored_by_the_evaluate_stages_rouge_l(tokenizer, tmp_path):
    from data.checkers import answer_checker
    from kdflow.config.data import DataSource
    from kdflow.evaluation.curves import snapshot_quality
    from kdflow.evaluation.free_text import greedy_rouge_l

    rows = [{"id": i, "question": q, "answer": "7+8=15"} for i, q in enumerate(["7+8", "15-5", "Answer: 10"])]
    net = student(tokenizer)
    never = answer_checker(DataSource.instructions)[0]  # refuses to be called: ROUGE-L asks no checker
    figure = snapshot_quality(net, tokenizer, rows, "{{ question }}", "rouge_l", never, 6, 2)
    assert figure == {"rouge_l": greedy_rouge_l(net, tokenizer, rows, "{{ question }}", 6, 2)[0]}


def rouge_curves():
    """``planted()`` as ROUGE-L × 100."""
    return {
        name: [{"step": p["step"], "seconds": p["seconds"], "rouge_l": 20 * p["accuracy"]} for p in points]
        for name, points in planted().items()
    }


def test_curves_of_rouge_l_name_it_and_the_teachers_figure():
    s = summarise(rouge_curves(), "seq-kd", teacher=13.87, metric="rouge_l")
    assert s["metric"] == "rouge_l" and s["teacher_rouge_l"] == 13.87 and "teacher_accuracy" not in s
    assert s["target"] == {"step": 300, "rouge_l": pytest.approx(18.0), "seconds": 30.0}
    assert s["reach"]["fast"]["step"] == 200  # the verdicts and reach do not depend on the scale
    lines = verdict_lines(s)
    assert "- At step 200, **fast beats seq-kd** by 8.4 (seed spread 2.2)." in lines
    assert any(line.startswith("- fast reaches seq-kd's final ROUGE-L (18.0) at step 200: 67%") for line in lines)
    assert "- slow does not reach seq-kd's final ROUGE-L (18.0 at step 300) at any measured step." in lines
    md = render(s, "curves.png")
    assert "Teacher ROUGE-L: 13.9. Cells: test ROUGE-L, mean ± sd over 3 seeds" in md
    assert "| 300 | 18.0 ± 0.4 (30 s) | 19.0 ± 0.2 (60 s) | 10.0 ± 2.0 (30 s) |" in md
    assert "accuracy" not in md and "![ROUGE-L vs student steps and wall time](curves.png)" in md
    assert plot_curves(s)[:4] == b"\x89PNG"
    # the accuracy path's summary keeps its keys
    acc = summarise(planted(), "seq-kd", teacher=0.98)
    assert acc["teacher_accuracy"] == 0.98 and acc["target"]["accuracy"] == pytest.approx(0.9)
    assert "Teacher accuracy: 0.980. Cells: test accuracy" in render(acc, None)


def test_a_warm_started_arm_is_counted_from_its_warm_start():
    points = shifted([{"step": 50, "seconds": 5.0, "accuracy": 0.5}], 100, 12.5)
    assert points == [{"step": 150, "seconds": 17.5, "accuracy": 0.5}]


def write(tmp_path, **fields):
    study = {
        "recipe": "recipes/demo.yaml",
        "students": ["baseline", "seq-kd"],
        "seeds": [0, 1, 2],
        "curve_points": 5,
        **fields,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_a_bad_study_fails_before_any_work(tmp_path):
    s = load_study(write(tmp_path))
    runs = s.runs(load_recipe(s.recipe_path()))
    assert [r.name for r in runs][:3] == ["baseline@0", "baseline@1", "baseline@2"] and len(runs) == 6
    assert all(r.curve_points == 5 for r in runs) and [r.seed for r in runs[:3]] == [0, 1, 2]
    added = {
        "name": "short",
        "data": "teacher",
        "architecture": {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128},
        "training": {"max_steps": 400},
    }
    s = load_study(write(tmp_path, add=[added], training={"max_steps": 1000, "learning_rate": 1e-3}))
    training = {r.name: r.training for r in s.runs(load_recipe(s.recipe_path()))}
    assert training["seq-kd@1"]["max_steps"] == 1000 and training["seq-kd@1"]["learning_rate"] == 1e-3
    assert training["short@1"] == {"max_steps": 400}  # an added arm's training is its own, whole
    with pytest.raises(RecipeError, match="no student named \\['nope'\\]"):
        load_study(write(tmp_path, students=["seq-kd", "nope"]))
    with pytest.raises(RecipeError, match="reference 'seq-kd' is not an arm"):
        load_study(write(tmp_path, students=["baseline"]))
    with pytest.raises(RecipeError, match="arm names must be unique"):
        load_study(write(tmp_path, students=["seq-kd", "seq-kd"]))
    with pytest.raises(RecipeError, match="warm_starts.seq-kd: both 'seq-kd' and 'other' must be arms"):
        load_study(write(tmp_path, warm_starts={"seq-kd": {"student": "other", "step": 300}}))
    with pytest.raises(RecipeError, match="curve_points"):
        load_study(write(tmp_path, curve_points=1))


@pytest.mark.slow
def test_the_study_flow_on_the_mini_recipe(prefect_server, mini_recipe, tmp_path):
    from flows.learning_curves import learning_curves

    raw = yaml.safe_load(mini_recipe.read_text())
    warm = {**raw["students"][1], "name": "warm", "training": {**raw["students"][1]["training"], "max_steps": 4}}
    path = write(
        tmp_path,
        recipe=str(mini_recipe),
        seeds=[0, 1],
        curve_points=2,
        add=[warm],
        warm_starts={"warm": {"student": "seq-kd", "step": 5}},
    )
    summary = learning_curves(str(path))

    assert set(summary["arms"]) == {"baseline", "seq-kd", "warm"}
    assert list(summary["arms"]["seq-kd"]) == [5, 10] and list(summary["arms"]["warm"]) == [7, 9]  # 5 + (2, 4)
    assert all(
        c["seeds"] == 2 and 0.0 <= c["mean"] <= 1.0 for curve in summary["arms"].values() for c in curve.values()
    )
    out = load_recipe(mini_recipe).run_dir / "studies" / "study"
    saved = json.loads((out / "curves.json").read_text())
    assert saved["curves"]["warm@1"][0]["seconds"] > saved["curves"]["seq-kd@1"][0]["seconds"]  # warm start counted
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG" and "| 5 |" in (out / "curves.md").read_text()
    # a second run trains and evaluates nothing: the same students and curves, from the stage outputs
    assert learning_curves(str(path))["arms"] == summary["arms"]


@pytest.mark.parametrize("name", ["study-curves.yaml", "study-on-policy.yaml", "study-commuted.yaml"])
def test_the_shipped_studies_load(name):
    s = load_study(ROOT_SWEEPS / name)
    assert len(s.runs(load_recipe(s.recipe_path()))) >= 6 and len(s.seeds) == 3


def test_the_smollm2_study_loads_and_is_scored_by_rouge_l():
    from kdflow.models.smollm2 import link
    from kdflow.reporting.quality_metric import source_metric

    link(ROOT)  # the GGUF the recipe names, as tests/config/test_recipe.py links it
    s = load_study(ROOT_SWEEPS / "study-curves-smollm2.yaml")
    r = load_recipe(s.recipe_path())
    runs = {run.name: run for run in s.runs(r)}
    assert source_metric(r.data.source) == "rouge_l" and len(runs) == 12 and len(s.seeds) == 3
    assert runs["on-policy-warm@2"].init.student == "offline-kd@2"  # after offline-kd@2, which it starts from
    assert list(runs).index("on-policy-warm@0") > list(runs).index("offline-kd@2")


def test_a_warm_start_must_name_a_step_its_source_saves(tmp_path):
    from flows.learning_curves import check_warm_starts

    s = load_study(ROOT_SWEEPS / "study-on-policy.yaml")
    r = load_recipe(s.recipe_path())
    check_warm_starts(s, s.arms(r))  # the shipped one: seq-kd's snapshot at 200 of its 1,000 steps
    bad = s.model_copy(
        update={
            "warm_starts": {
                "seq-kd-then-on-policy": s.warm_starts["seq-kd-then-on-policy"].model_copy(update={"step": 250})
            }
        }
    )
    with pytest.raises(ValueError, match=r"step 250: 'seq-kd' saves snapshots at \[200, 400, 600, 800\]"):
        check_warm_starts(bad, bad.arms(r))


def test_each_snapshot_is_loaded_in_the_evaluation_dtype(tokenizer, tmp_path, monkeypatch):
    # The evaluate stage loads the finished student in evaluation.dtype; its curve's points must be the same model.
    from kdflow.config.precision import Dtype
    from kdflow.evaluation import curves
    from kdflow.training.curves import CURVE, INDEX

    net = student(tokenizer)
    net.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / CURVE).mkdir()
    point = {"step": 9, "seconds": 1.0, "model": "model"}
    (tmp_path / CURVE / INDEX).write_text(json.dumps({"points": [point], "max_steps": 9, "resumed_at": None}))
    seen = []
    monkeypatch.setattr(curves, "snapshot_quality", lambda net, *a: seen.append(net.dtype) or {"accuracy": 0.0})
    curves.curve_quality(tmp_path, [], "{{ question }}", "accuracy", None, 4, 2, Dtype.bfloat16)
    curves.curve_quality(tmp_path, [], "{{ question }}", "accuracy", None, 4, 2)
    assert seen == [torch.bfloat16, torch.float32]
