"""Offline white-box KD from a real logit cache (kdflow/training/offline_kd.py): alignment by row id, masks, the loss
going down with both terms logged, refusals (packing, another tokenizer), and resuming from a checkpoint."""

import json
import re

import pandas as pd
import pytest
import torch
from transformers import TrainerCallback

from kdflow.config.kd import Divergence
from kdflow.config.logit_cache import LogitCacheSection
from kdflow.config.training import trainer_config
from kdflow.logit_cache.format import CacheMismatch
from kdflow.logit_cache.reader import LogitCache
from kdflow.store.model_folders import write_location
from kdflow.training.losses import IGNORE_INDEX
from kdflow.training.offline_kd import CachedLogitsCollator, OfflineKDConfig, cache_rows, train_offline_kd
from kdflow.training.tiny_models import llama_model, train_tokenizer
from tests.logit_cache.test_capture import TEMPLATE, kept_rows, stage_ref, tiny_teacher

torch.set_num_threads(1)
TRAINING = {
    "max_steps": 40,
    "per_device_train_batch_size": 8,
    "learning_rate": 3e-3,
    "logging_steps": 10,
    "max_length": 64,
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A real cache: a sharpened tiny teacher's top-5 on 48 kept answers, through the capture stage."""
    from tasks.capture import capture_logits

    tmp = tmp_path_factory.mktemp("kd")
    run_dir = tmp / "run"
    _, tokenizer = tiny_teacher(tmp / "teacher-model", sharpen=20.0)
    teacher = stage_ref(run_dir, "teacher", lambda d: write_location(d, str(tmp / "teacher-model")))
    curated = stage_ref(run_dir, "curate", lambda d: pd.DataFrame(kept_rows(48)).to_parquet(d / "kept.parquet"))
    ref = capture_logits.fn(
        run_dir, LogitCacheSection(k=5, shard_rows=16, value_encoding="fp16"), TEMPLATE, teacher, curated
    )
    return LogitCache.open(ref.path, expect_tokenizer=tokenizer), tokenizer


def student(tokenizer, seed=0):
    return llama_model(tokenizer, hidden=32, layers=1, heads=1, intermediate=64, seed=seed)


def kd_config(cache, training, out, checkpoints=None, **settings):
    """The offline KD config of ``settings`` on ``cache``, as the students stage builds it."""
    return trainer_config(training, out, 0, checkpoints, OfflineKDConfig, logit_cache=str(cache.folder), **settings)


def test_the_collator_aligns_teacher_positions_with_completion_tokens(cache):
    cache, tok = cache
    rows = cache_rows(cache)
    batch = CachedLogitsCollator(cache, tok.pad_token_id)(rows[:4])
    for b, r in enumerate(rows[:4]):
        cached, n, start = cache[r["row_id"]], len(r["input_ids"]), r["start"]
        assert batch["attention_mask"][b].sum() == n
        # labels: the completion tokens only; the prompt and the padding are -100
        assert (batch["labels"][b, : start + 1] == IGNORE_INDEX).all() and (
            batch["labels"][b, n:] == IGNORE_INDEX
        ).all()
        assert torch.equal(batch["labels"][b, start + 1 : n], cached.input_ids[start + 1 : n])
        # teacher distributions sit at the logit positions that predict exactly those tokens
        at = batch["teacher_mask"][b].nonzero().squeeze(-1)
        assert at.tolist() == list(range(start, n - 1))
        assert torch.equal(batch["teacher_ids"][b, at], cached.ids) and torch.equal(
            batch["teacher_tail"][b, at], cached.tail
        )


def test_alignment_holds_across_shuffles_and_a_tampered_row_is_refused(cache):
    cache, tok = cache
    rows = cache_rows(cache)
    collate = CachedLogitsCollator(cache, tok.pad_token_id)
    by_id = {r["row_id"]: collate([r]) for r in rows}
    shuffled = [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(3)).tolist()]
    batch = collate(shuffled[:8])
    for b, r in enumerate(shuffled[:8]):
        one, n = by_id[r["row_id"]], len(r["input_ids"])
        assert torch.equal(batch["teacher_logprobs"][b, :n], one["teacher_logprobs"][0, :n])
    swapped = {**rows[0], "input_ids": rows[1]["input_ids"]}
    with pytest.raises(ValueError, match="out of step"):
        collate([swapped])


def test_the_kd_trainer_learns_from_the_cache_and_logs_both_terms(cache, tmp_path):
    cache, tok = cache
    seen = []
    original = CachedLogitsCollator.__call__

    def recording(self, examples):
        seen.extend(e["row_id"] for e in examples)
        return original(self, examples)

    model = student(tok)
    CachedLogitsCollator.__call__ = recording
    try:
        config = kd_config(cache, {**TRAINING, "max_steps": 60}, tmp_path / "out", alpha=0.5, temperature=2.0)
        history = train_offline_kd(model, tok, None, config, tmp_path / "out")
    finally:
        CachedLogitsCollator.__call__ = original
    logs = [h for h in history if "kd_loss" in h]
    assert len(logs) == 6 and all("ce_loss" in h for h in logs)
    assert logs[-1]["kd_loss"] < 0.7 * logs[0]["kd_loss"] and logs[-1]["ce_loss"] < logs[0]["ce_loss"]
    # 60 steps of 8 = 10 epochs of 48 rows: every row seen each epoch, in a shuffled order
    assert sorted(seen) == sorted(cache.row_ids * 10) and seen[:48] != cache.row_ids
    assert (tmp_path / "out" / "model" / "config.json").is_file()


def test_each_divergence_trains_without_nans(cache, tmp_path):
    cache, tok = cache
    for kind in Divergence:
        training = {**TRAINING, "max_steps": 4, "logging_steps": 2}
        config = kd_config(cache, training, tmp_path / kind.value, divergence=kind, alpha=0.0)
        history = train_offline_kd(student(tok), tok, None, config, tmp_path / kind.value)
        losses = [h["kd_loss"] for h in history if "kd_loss" in h]
        assert losses and all(torch.isfinite(torch.tensor(losses))), kind


def test_packing_and_a_cache_for_another_tokenizer_are_refused_before_training(cache, tmp_path):
    cache, tok = cache
    with pytest.raises(ValueError, match="packing"):
        kd_config(cache, {**TRAINING, "packing": True}, tmp_path)
    other = train_tokenizer([f"{a}*{b}={a * b}" for a in range(10) for b in range(10)], 40)
    with pytest.raises(CacheMismatch):
        train_offline_kd(student(other), other, None, kd_config(cache, TRAINING, tmp_path), tmp_path)


@pytest.mark.parametrize(
    "setting, value, fix",
    [
        ("alpha", 1.5, "less than or equal to 1"),
        ("beta", -0.1, "greater than or equal to 0"),
        ("skew", 1.0, "less than 1"),
        ("temperature", 0.0, "a softmax temperature must be in [0.01, 50.0]"),
        ("divergence", "kl", "'kl' is not a valid Divergence"),
    ],
)
def test_the_config_refuses_a_setting_out_of_range_naming_it(cache, tmp_path, setting, value, fix):
    """The recipe section's own checks, on the config a trainer takes (a library user builds one directly)."""
    with pytest.raises(ValueError, match=re.escape(fix)) as info:
        kd_config(cache[0], TRAINING, tmp_path, **{setting: value})
    assert setting == "divergence" or f"OfflineKDConfig.{setting} = {value!r}" in str(info.value)
    with pytest.raises(ValueError, match="logit_cache"):
        trainer_config(TRAINING, tmp_path, 0, None, OfflineKDConfig)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {self.step}")


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_an_interrupted_run_resumes_from_its_checkpoint(cache, tmp_path):
    cache, tok = cache
    training = {**TRAINING, "max_steps": 20, "save_steps": 5, "logging_steps": 1}
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        config = kd_config(cache, training, tmp_path / "a", checkpoints)
        train_offline_kd(student(tok), tok, None, config, tmp_path / "a", callbacks=[StopAt(12)])
    assert (checkpoints / "checkpoint-10").is_dir()
    counter = CountSteps()
    config = kd_config(cache, training, tmp_path / "b", checkpoints)
    history = train_offline_kd(student(tok, seed=1), tok, None, config, tmp_path / "b", callbacks=[counter])
    assert history[0] == {"resumed_from": "checkpoint-10"}
    assert counter.steps == list(range(11, 21))  # continued from step 10: 10 more steps, not 20 from 0
    assert [h["step"] for h in history[1:] if "loss" in h] == list(range(1, 21))  # one log, no step twice
    assert json.loads((tmp_path / "b" / "log_history.json").read_text())[0] == {"resumed_from": "checkpoint-10"}
    assert (checkpoints / "checkpoint-20").is_dir()  # kept: the stage removes them once its output is in place


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_chunked_head_trains_the_same_student_as_the_dense_loss(cache, tmp_path, monkeypatch, lora):
    """Forced through the chunked head (3 rows a chunk, so a batch's ~80 answer positions take ~27 chunks), six
    steps log the same CE and KD terms and end at the same weights as the dense loss; a LoRA student too (its
    hidden states come from the adapted decoder)."""
    import kdflow.training.chunked_loss as chunked
    import kdflow.training.offline_kd as offline_kd
    from kdflow.config.student import LoraSection
    from kdflow.training.lora import lora_config

    cache, tok = cache
    calls = []

    def run(name):
        model = student(tok)
        peft = lora_config(LoraSection(r=4), model) if lora else None
        training = {**TRAINING, "max_steps": 6, "logging_steps": 1}
        config = kd_config(cache, training, tmp_path / name, divergence=Divergence.jsd, alpha=0.3, temperature=2.0)
        history = train_offline_kd(model, tok, None, config, tmp_path / name, peft_config=peft)
        from transformers import AutoModelForCausalLM

        # the saved model is the trained one (merged with its adapter for LoRA)
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / name / "model").state_dict()
        return [(h["ce_loss"], h["kd_loss"]) for h in history if "kd_loss" in h], saved

    dense, dense_weights = run("dense")
    original = offline_kd.head_losses
    monkeypatch.setattr(offline_kd, "head_losses", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 3 * len(tok))
    fused, fused_weights = run("chunked")
    assert len(calls) == 6  # every step took the chunked head
    assert len(fused) == len(dense) == 6
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(dense), rtol=1e-4, atol=1e-5)
    for name, value in dense_weights.items():
        torch.testing.assert_close(fused_weights[name], value, rtol=1e-3, atol=1e-4, msg=name)
    assert any(not torch.equal(value, student(tok).state_dict()[name]) for name, value in fused_weights.items())


def test_a_model_whose_logits_need_more_than_its_head_takes_the_dense_path_and_says_why(cache, caplog):
    from peft import get_peft_model

    from kdflow.config.student import LoraSection
    from kdflow.training.head import dense_reason, fused_head
    from kdflow.training.lora import lora_config

    _, tok = cache
    capped = student(tok)
    capped.config.final_logit_softcapping = 30.0  # Gemma 2's tanh cap after the head
    assert "final_logit_softcapping" in dense_reason(capped)
    with caplog.at_level("WARNING"):
        assert fused_head(capped, 10**9) is None
    assert "dense loss path" in caplog.text and "final_logit_softcapping" in caplog.text
    plain = student(tok)
    assert dense_reason(plain) is None and fused_head(plain, 10**9) is plain.lm_head
    assert fused_head(plain, 1) is None  # one chunk holds every row (the demo's 52 ids): the dense path, unchanged
    adapted = get_peft_model(student(tok), lora_config(LoraSection(r=4), student(tok)))
    assert dense_reason(adapted) is None and fused_head(adapted, 10**9) is adapted.get_base_model().lm_head
