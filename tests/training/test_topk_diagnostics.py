"""Top-k diagnostics (issue 26, part 5; kdflow/training/topk_diagnostics.py): each number on hand-made tensors in
closed form, the chunked head's student top-1 as the dense argmax, the training unchanged by them (weights
bit-identical to a pure-loss trainer's, dense and chunked), an offline-KD and an on-policy student logging them per
step, and a students-stage manifest and the report carrying the table."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import kdflow.training.chunked_loss as chunked
import kdflow.training.offline_kd as offline_kd
from kdflow.config.kd import Divergence
from kdflow.config.logit_cache import LogitCacheSection
from kdflow.config.student import StudentSection
from kdflow.config.training import trainer_config
from kdflow.reporting.topk_report import lines, warnings, with_warnings
from kdflow.store.model_folders import write_location
from kdflow.training.chunked_loss import Teacher, head_losses
from kdflow.training.losses import IGNORE_INDEX, cross_entropy, reduce, sparse_kd_loss
from kdflow.training.offline_kd import TEACHER_KEYS, OfflineKDConfig, train_offline_kd
from kdflow.training.tiny_models import llama_model
from kdflow.training.topk_diagnostics import brief, outside_topk, position_means, summary, teacher_mass, window_ratio
from tests.logit_cache.test_capture import TEMPLATE, kept_rows, stage_ref, tiny_teacher

torch.set_num_threads(1)
TRAINING = {
    "max_steps": 4,
    "per_device_train_batch_size": 8,
    "learning_rate": 3e-3,
    "logging_steps": 2,
    "max_length": 64,
}
DIAGNOSTICS = ("topk_kept_mass", "topk_tail_mass", "top1_outside_topk", "kd_ce_ratio")


# ---- each number in closed form ----------------------------------------------------------------------------------


def test_kept_and_tail_mass_are_the_teachers_top_k_sum_and_the_rest():
    logprobs = torch.tensor([[0.5, 0.3], [0.9, 0.05]]).log()
    tail = torch.tensor([0.2, 0.05]).log()
    kept, rest = teacher_mass(logprobs, tail, vocab_size=10)
    torch.testing.assert_close(kept, torch.tensor([0.8, 0.95]))
    torch.testing.assert_close(rest, torch.tensor([0.2, 0.05]))
    # a cache whose stored tail is off by rounding: the masses are normalised as the loss's buckets are
    kept, rest = teacher_mass(torch.tensor([[0.6, 0.3]]).log(), torch.tensor([0.2]).log(), vocab_size=10)
    torch.testing.assert_close(kept + rest, torch.tensor([1.0]))
    torch.testing.assert_close(rest, torch.tensor([0.2 / 1.1]))
    # a top-k holding the whole vocabulary has no tail, whatever floor the cache stored
    kept, rest = teacher_mass(torch.tensor([[0.7, 0.3]]).log(), torch.tensor([-30.0]), vocab_size=2)
    assert rest.item() == 0.0 and kept.item() == pytest.approx(1.0)


def test_the_outside_share_counts_positions_whose_student_top1_is_none_of_the_teachers_ids():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 2, 3]])
    top1 = torch.tensor([3, 0, 9, 4])
    assert outside_topk(top1, ids).tolist() == [False, True, False, True]
    logprobs = torch.full((4, 3), math.log(0.3))
    tail = torch.full((4,), math.log(0.1))
    means = position_means(logprobs, tail, outside_topk(top1, ids), vocab_size=20)
    assert means["top1_outside_topk"] == pytest.approx(0.5)
    assert means["topk_kept_mass"] == pytest.approx(0.9) and means["topk_tail_mass"] == pytest.approx(0.1)
    # the mask keeps positions 0 and 2 only: none of them is outside
    masked = position_means(logprobs, tail, outside_topk(top1, ids), 20, mask=torch.tensor([True, False, True, False]))
    assert masked["top1_outside_topk"] == 0.0


def test_the_kd_ce_ratio_is_that_of_the_windows_mean_terms():
    assert window_ratio({"ce_loss": [2.0, 4.0], "kd_loss": [0.3, 0.9]}) == {"kd_ce_ratio": pytest.approx(0.2)}
    assert window_ratio({"ce_loss": [2.0]}) == {}  # no KD term: no ratio
    assert window_ratio({"ce_loss": [0.0], "kd_loss": [0.1]}) == {}  # nothing to compare with


def test_the_summary_keeps_the_mean_and_the_first_and_last_windows():
    step = lambda s, kept, outside, ce, kd: {
        "step": s,
        "loss": 1.0,
        "topk_kept_mass": kept,
        "topk_tail_mass": 1 - kept,
        "top1_outside_topk": outside,
        "ce_loss": ce,
        "kd_loss": kd,
        "kd_ce_ratio": kd / ce,
    }
    history = [
        step(10, 0.8, 0.4, 4.0, 1.0),
        step(20, 0.9, 0.2, 2.0, 0.5),
        step(30, 1.0, 0.0, 1.0, 0.5),
        {"train_runtime": 3.0, "step": 30},
    ]
    s = summary(history, alpha=0.5)
    assert s["logging_steps"] == 3 and s["alpha"] == 0.5
    assert s["mean"]["topk_kept_mass"] == pytest.approx(0.9) and s["mean"]["top1_outside_topk"] == pytest.approx(0.2)
    assert s["mean"]["kd_ce_ratio"] == pytest.approx((2.0 / 3) / (7.0 / 3))  # of the mean terms, not a mean of ratios
    assert s["first"]["step"] == 10 and s["first"]["kd_ce_ratio"] == 0.25
    assert s["last"]["step"] == 30 and s["last"]["topk_tail_mass"] == 0.0
    assert summary([{"step": 1, "loss": 1.0}]) == {}  # a student without a top-k teacher
    assert brief(history[0]) == "kept 0.800  tail 0.200  top-1 outside 40.0%  kd/ce 0.25" and brief({}) == ""


def test_worrying_values_are_flagged_and_shown_in_the_table():
    fine = {
        "topk_kept_mass": 0.97,
        "topk_tail_mass": 0.03,
        "top1_outside_topk": 0.01,
        "ce_loss": 1.0,
        "kd_loss": 0.2,
        "kd_ce_ratio": 0.2,
    }
    bad = {**fine, "topk_kept_mass": 0.85, "topk_tail_mass": 0.15, "top1_outside_topk": 0.3, "kd_ce_ratio": 0.001}
    assert warnings({"mean": fine, "last": fine}) == []
    flagged = warnings({"mean": fine, "last": bad})
    assert len(flagged) == 3 and all(w.startswith("last: ") for w in flagged)
    assert "tail mass 0.150 > 0.1" in flagged[0] and "30.0%" in flagged[1] and "barely trains" in flagged[2]
    report = {
        "students": {
            "seq-kd": {"data": "teacher"},
            "kd": {
                "topk": with_warnings(
                    {
                        "logging_steps": 3,
                        "alpha": 0.5,
                        "mean": fine,
                        "first": {"step": 10, **bad},
                        "last": {"step": 30, **bad},
                    }
                )
            },
        }
    }
    md = "\n".join(lines(report))
    assert "## Top-k diagnostics" in md and "**kd** (α 0.5, 3 logging steps)" in md and "seq-kd" not in md
    assert "| mean over training | 0.970 | 0.030 | 1.0% | 1 | 0.2 | 0.2 |" in md
    assert "| last (step 30) | 0.850 | 0.150 | 30.0% | 1 | 0.2 | 0.001 |" in md
    assert "- ⚠ last: tail mass 0.150" in md and "verl #7856" in md
    assert lines({"students": {"seq-kd": {"data": "teacher"}}}) == []


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_chunked_heads_outside_share_is_the_dense_argmaxs(temperature):
    g = torch.Generator().manual_seed(0)
    n, h, v, k = 40, 8, 30, 4
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    dense = hidden @ weight.T
    # half the rows hold the student's argmax among the teacher's ids, half do not
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    ids[::2, 0] = dense.argmax(-1)[::2]
    ids[1::2] = torch.stack([torch.tensor([i for i in range(v) if i != dense[r].argmax()][:k]) for r in range(1, n, 2)])
    logprobs = torch.log_softmax(torch.randn(n, k + 1, generator=g), -1)
    teacher = Teacher(ids, logprobs[:, :k], logprobs[:, k], Divergence.forward_kl, temperature)
    assert teacher.student_outside is None
    head_losses(hidden, weight, teacher=teacher, chunk_size=7)
    expected = outside_topk(dense.argmax(-1), ids)
    assert expected[::2].logical_not().all() and expected[1::2].all()
    assert torch.equal(teacher.student_outside, expected)
    # a top-k holding the whole vocabulary: nothing is outside
    full = Teacher(torch.arange(v).expand(n, v), torch.full((n, v), -math.log(v)), torch.full((n,), -30.0))
    head_losses(hidden, weight, teacher=full, chunk_size=7)
    assert not full.student_outside.any()


# ---- the training is unchanged ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A real logit cache (a sharpened tiny teacher's top-5 on 48 kept answers, through the capture stage) and the
    stage references a students stage reads."""
    from tasks.capture import capture_logits

    tmp = tmp_path_factory.mktemp("topk")
    run_dir = tmp / "run"
    _, tokenizer = tiny_teacher(tmp / "teacher-model", sharpen=20.0)
    teacher = stage_ref(run_dir, "teacher", lambda d: write_location(d, str(tmp / "teacher-model")))
    curated = stage_ref(run_dir, "curate", lambda d: pd.DataFrame(kept_rows(48)).to_parquet(d / "kept.parquet"))
    logits = capture_logits.fn(
        run_dir, LogitCacheSection(k=5, shard_rows=16, value_encoding="fp16"), TEMPLATE, teacher, curated
    )
    data = stage_ref(run_dir, "data", lambda d: None)
    return {
        "tokenizer": tokenizer,
        "run_dir": run_dir,
        "teacher": teacher,
        "curated": curated,
        "logits": logits,
        "data": data,
        "teacher_dir": tmp / "teacher-model",
    }


class PureLoss(offline_kd.CachedKDTrainer):
    """The offline-KD loss without the diagnostics: the same terms, nothing else computed or logged."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from kdflow.training.head import final_hidden_states, fused_head

        teacher = {key: inputs.pop(key) for key in TEACHER_KEYS}
        targets = inputs.pop("labels")[:, 1:]
        kd_at = teacher["teacher_mask"][:, :-1]
        at = (targets != IGNORE_INDEX) | kd_at
        head = fused_head(model, int(at.sum()))
        if head is not None:
            _, hidden = final_hidden_states(model, inputs)
            kd_teacher = Teacher(
                *(teacher[key][:, :-1][at] for key in TEACHER_KEYS[:3]), self.args.divergence, self.args.temperature
            )
            ce_rows, kd_rows = head_losses(
                hidden[:, :-1][at], head.weight, head.bias, labels=targets[at], teacher=kd_teacher
            )
            ce, kd = reduce(ce_rows, targets[at] != IGNORE_INDEX, "mean"), reduce(kd_rows, kd_at[at], "mean")
        else:
            logits = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
            ).logits[:, :-1]
            ce = cross_entropy(logits, targets)
            kd = sparse_kd_loss(
                logits[kd_at],
                *(teacher[key][:, :-1][kd_at] for key in TEACHER_KEYS[:3]),
                self.args.divergence,
                self.args.temperature,
            )
        self._metrics["train"]["ce_loss"].append(ce.item())
        self._metrics["train"]["kd_loss"].append(kd.item())
        return self.args.alpha * ce + (1.0 - self.args.alpha) * kd


@pytest.mark.parametrize("path", ["dense", "chunked"])
def test_diagnostics_leave_the_weights_and_losses_bit_identical(setup, tmp_path, monkeypatch, path):
    tok = setup["tokenizer"]
    if path == "chunked":  # the chunked head on this 52-id vocabulary: 3 rows per chunk
        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 3 * len(tok))

    def run(name):
        model = llama_model(tok, hidden=32, layers=1, heads=1, intermediate=64, seed=0)
        history = train_offline_kd(
            model,
            tok,
            None,
            trainer_config(
                {**TRAINING, "logging_steps": 1},
                tmp_path / name,
                0,
                None,
                OfflineKDConfig,
                logit_cache=str(setup["logits"].path),
                divergence=Divergence.forward_kl,
                alpha=0.5,
                temperature=2.0,
            ),
            tmp_path / name,
        )
        return history, {k: v.clone() for k, v in model.state_dict().items()}

    with_diagnostics, weights = run("on")
    monkeypatch.setattr(offline_kd, "CachedKDTrainer", PureLoss)
    pure, pure_weights = run("pure")
    assert all(torch.equal(weights[k], pure_weights[k]) for k in weights)
    terms = lambda h: [(x["loss"], x["ce_loss"], x["kd_loss"]) for x in h if "kd_loss" in x]  # noqa: E731
    assert terms(with_diagnostics) == terms(pure) and len(terms(pure)) == 4
    assert all(k in h for h in with_diagnostics if "kd_loss" in h for k in DIAGNOSTICS)
    assert not any("topk_kept_mass" in h for h in pure)


# ---- logged per step, in the manifest, in the report ---------------------------------------------------------------


def test_an_offline_kd_students_manifest_and_report_carry_its_diagnostics(setup, capsys):
    from kdflow.reporting.run_report import build_report, render_markdown
    from tasks.report import trained
    from tasks.students import train_student
    from tests.reporting.test_report import CURATION, DEPLOYMENT, model

    section = StudentSection(
        name="kd",
        data="teacher",
        architecture={"hidden": 32, "layers": 1, "heads": 1, "intermediate": 64},
        kd={"divergence": "forward_kl", "alpha": 0.3},
        training=TRAINING,
    )
    ref = train_student.fn(
        setup["run_dir"], section, TEMPLATE, setup["teacher"], setup["data"], setup["curated"], setup["logits"]
    )
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[students kd] step 4/4"))
    assert "  kept " in line and "  tail " in line and "top-1 outside " in line and "kd/ce " in line
    topk = ref.manifest()["topk"]
    assert topk["logging_steps"] == 2 and topk["alpha"] == 0.3
    assert (topk["first"]["step"], topk["last"]["step"]) == (2, 4)
    for window in ("mean", "first", "last"):
        d = topk[window]
        assert 0.5 < d["topk_kept_mass"] <= 1.0 and d["topk_kept_mass"] + d["topk_tail_mass"] == pytest.approx(1.0)
        assert 0.0 <= d["top1_outside_topk"] <= 1.0
        assert d["kd_ce_ratio"] == pytest.approx(d["kd_loss"] / d["ce_loss"], rel=1e-4)
    history = json.loads((Path(ref.path) / "log_history.json").read_text())
    assert topk["last"]["topk_kept_mass"] == pytest.approx(history[-2]["topk_kept_mass"], abs=1e-6)

    students = {"kd": {**model(0.8, 100_000), "data": "teacher", **section.summary(), **trained(ref)}}
    report = build_report("demo", model(0.9, 1_000_000), students, CURATION, DEPLOYMENT)
    assert report["students"]["kd"]["topk"]["mean"] == topk["mean"] and "warnings" in report["students"]["kd"]["topk"]
    md = render_markdown(report)
    assert "## Top-k diagnostics" in md and "**kd** (α 0.3, 2 logging steps)" in md and "| last (step 4) |" in md


def test_an_on_policy_student_logs_them_per_step_one_value_per_micro_batch(setup, tmp_path):
    from kdflow.config.kd import OnPolicyKD
    from kdflow.config.templates import chat
    from kdflow.training.on_policy import train_on_policy
    from tests.training.test_on_policy import op_config

    tok = setup["tokenizer"]
    rows = [
        {"row_id": f"r{i}", **chat(f"Solve step by step: {r['question']}", r["text"])}
        for i, r in enumerate(kept_rows(16))
    ]
    history = train_on_policy(
        llama_model(tok, hidden=32, layers=1, heads=1, intermediate=64, seed=0),
        tok,
        rows,
        op_config(
            OnPolicyKD(method="on_policy", k=5, max_new_tokens=8),
            setup["teacher_dir"],
            None,
            TRAINING,
            tmp_path / "out",
        ),
        tmp_path / "out",
    )
    steps = [h for h in history if "kd_loss" in h]
    assert len(steps) == 2
    for h in steps:
        assert 0.0 < h["topk_kept_mass"] <= 1.0 and h["topk_kept_mass"] + h["topk_tail_mass"] == pytest.approx(1.0)
        assert 0.0 <= h["top1_outside_topk"] <= 1.0
        assert h["kd_ce_ratio"] == pytest.approx(h["kd_loss"] / h["ce_loss"], rel=1e-4)
    assert summary(history, alpha=0.0)["alpha"] == 0.0
