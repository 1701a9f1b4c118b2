"""``dtype`` in the recipe (issue 14 item 2): one enum for teacher, students, logit_cache and evaluation, validated
with the field and the allowed values; unset, it changes no key; each dtype reaches the models where they are
loaded, trained, captured and evaluated (on a CPU: bf16 and fp32 train, fp16 training is refused, fp16 runs)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from kdflow.config.logit_cache import LogitCacheSection
from kdflow.config.precision import Dtype, check_trainable_here, training_flags
from kdflow.config.recipe import parse_recipe
from kdflow.config.student import StudentSection
from kdflow.config.templates import chat
from kdflow.store.model_folders import write_location
from kdflow.store.outputs import canonical
from tests.config.test_recipe import DEMO, error_of
from tests.logit_cache.test_capture import TEMPLATE, kept_rows, stage_ref, tiny_teacher

torch.set_num_threads(1)
STUDENT = {
    "name": "s",
    "data": "gold",
    "architecture": {"hidden": 32, "layers": 1, "heads": 1, "intermediate": 64},
    "training": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 3e-3, "logging_steps": 2},
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dtype")
    model, tokenizer = tiny_teacher(tmp / "teacher-model", sharpen=20.0)
    return tmp, stage_ref(tmp / "run", "teacher", lambda d: write_location(d, str(tmp / "teacher-model"))), tokenizer


def test_a_bad_dtype_names_the_field_and_the_allowed_values():
    text = DEMO.replace("  vocab_size: 64\n", "  vocab_size: 64\n  dtype: bf16\n")
    message = error_of(text)
    assert "teacher.dtype" in message and "'bfloat16', 'float16' or 'float32'" in message


def test_a_training_flag_that_contradicts_dtype_is_refused_naming_both():
    text = DEMO.replace(
        "  - name: seq-kd            # SFT on the teacher's verified answers (gold prompts + 8,000 more)\n",
        "  - name: seq-kd\n    dtype: float32\n",
    )
    text = text.replace(
        "    data: teacher\n    architecture: *student\n    training: *student_training\n  # White",
        "    data: teacher\n    architecture: *student\n    training: {bf16: true, max_steps: 10}\n  # White",
        1,
    )
    message = error_of(text)
    assert "students.1" in message and "training.bf16: True contradicts dtype: float32" in message


def test_unset_it_changes_no_key_or_summary_and_set_it_does():
    recipe = parse_recipe(DEMO, "demo.yaml")
    for section in [recipe.teacher, recipe.logit_cache, recipe.evaluation, *recipe.students]:
        assert section.dtype is None and "dtype" not in json.dumps(canonical(section))
    student = recipe.students[0]
    bf16 = student.model_copy(update={"dtype": Dtype.bfloat16})
    assert "dtype" not in student.summary() and bf16.summary()["dtype"] == "bfloat16"
    assert canonical(bf16) != canonical(student)


def test_each_dtype_sets_trls_precision_flags():
    assert training_flags(None) == {}
    assert training_flags(Dtype.bfloat16) == {"bf16": True, "fp16": False}
    assert training_flags(Dtype.float16) == {"bf16": False, "fp16": True}
    assert training_flags(Dtype.float32) == {"bf16": False, "fp16": False}


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 training is allowed on a GPU")
def test_fp16_training_is_refused_on_a_cpu_before_any_work():
    with pytest.raises(ValueError, match="student 's'.dtype float16: fp16 training needs a CUDA GPU"):
        check_trainable_here(Dtype.float16, "student 's'")
    check_trainable_here(Dtype.bfloat16, "student 's'")  # bf16 and fp32 train on a CPU


@pytest.mark.parametrize(
    "dtype, weights",
    [(None, torch.float32), ("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float32)],
)
def test_a_student_starts_in_its_dtype(teacher, dtype, weights):
    """float16 keeps float32 master weights: fp16 autocast trains them, with loss scaling."""
    from kdflow.training.student import init_student

    _, ref, _ = teacher
    model, _ = init_student(StudentSection(**STUDENT, dtype=dtype), ref)
    assert {p.dtype for p in model.parameters()} == {weights}


def test_a_bfloat16_student_trains_on_a_cpu_and_is_saved_in_bfloat16(teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    from kdflow.training.student import train_here

    _, ref, _ = teacher
    rows = [
        {**chat(f"{a}+{b}", f"{a}+{b}={a + b}\nAnswer: {a + b}"), "row_id": f"r{a}{b}"}
        for a in range(4)
        for b in range(4)
    ]
    train_here(StudentSection(**STUDENT, dtype="bfloat16"), rows, ref, None, tmp_path, None)
    history = json.loads((tmp_path / "log_history.json").read_text())
    assert [h["loss"] for h in history if "loss" in h] and all(np.isfinite(h["loss"]) for h in history if "loss" in h)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype="auto")
    assert {p.dtype for p in saved.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_capture_runs_in_its_dtype_with_float32_log_probs(teacher, dtype, monkeypatch):
    """The capture stage loads the teacher in the section's dtype; the cache's log-probs agree with float32's
    within the dtype's rounding (bf16 logits: 8 mantissa bits; fp16: 11)."""
    import kdflow.logit_cache.topk as topk
    from kdflow.logit_cache.reader import LogitCache
    from tasks.capture import capture_logits

    tmp, ref, tokenizer = teacher
    run_dir = tmp / f"run-{dtype}"
    curated = stage_ref(run_dir, "curate", lambda d: pd.DataFrame(kept_rows(8)).to_parquet(d / "kept.parquet"))
    seen, real = [], topk.hf_topk
    monkeypatch.setattr(topk, "hf_topk", lambda model, *a: seen.append(model.dtype) or real(model, *a))
    caches = {}
    for d in ("float32", dtype):
        out = capture_logits.fn(
            run_dir, LogitCacheSection(k=5, shard_rows=4, value_encoding="fp16", dtype=d), TEMPLATE, ref, curated
        )
        caches[d] = LogitCache.open(out.path, expect_tokenizer=tokenizer)
    assert seen[-1] == getattr(torch, dtype)
    tolerance = {"float32": 0.0, "bfloat16": 0.25, "float16": 0.05}[dtype]
    for row_id in caches["float32"].row_ids:
        a, b = caches["float32"][row_id], caches[dtype][row_id]
        assert a.logprobs.dtype == b.logprobs.dtype == torch.float32
        assert (a.logprobs[:, 0] - b.logprobs[:, 0]).abs().max() <= tolerance + 1e-3  # fp16 storage of the cache


def test_a_vllm_capture_serves_the_teacher_in_the_sections_dtype(teacher):
    from kdflow.logit_cache.capture import vllm_capture_args

    tmp, _, _ = teacher
    model_dir = str(tmp / "teacher-model")

    def dtype(args):
        return args[args.index("--dtype") + 1]

    assert dtype(vllm_capture_args(LogitCacheSection(source="vllm", dtype="bfloat16"), model_dir)) == "bfloat16"
    assert dtype(vllm_capture_args(LogitCacheSection(source="vllm"), model_dir)) == "float32"  # the model's
    with pytest.raises(ValueError, match="source 'api'"):
        LogitCacheSection(source="api", dtype="bfloat16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_evaluation_loads_the_model_and_the_teacher_in_its_dtype(teacher, dtype, monkeypatch):
    import kdflow.evaluation.model_metrics as metrics
    from kdflow.config.evaluation import EvaluationSection

    tmp, _, _ = teacher
    loaded, real = [], metrics.load
    monkeypatch.setattr(metrics, "load", lambda d, dt=None: loaded.append(real(d, dt)[0].dtype) or real(d, dt))
    rows = [
        {
            "id": f"test-{a}{b}",
            "question": f"{a}+{b}",
            "rationale": f"{a}+{b}={a + b}\nAnswer: {a + b}",
            "answer": str(a + b),
        }
        for a in range(3)
        for b in range(2)
    ]
    folder = str(tmp / "teacher-model")
    result, _ = metrics.evaluate(
        folder,
        folder,
        rows,
        TEMPLATE,
        lambda text, gold: gold in text,
        EvaluationSection(max_new_tokens=8, batch_size=8, dtype=dtype),
    )
    assert loaded == [getattr(torch, dtype)] * 2 and 0.0 <= result["accuracy"] <= 1.0
