"""Capture at Qwen2.5's vocabulary (151,936 rows) on CPU, small sizes (issue 14 item 4): hf_topk equals the dense
log-softmax, only answer positions reach the LM head and at most a chunk at a time, bf16 captures within a
stated tolerance of float32, and an offline-KD student trains from the cache."""

import random

import numpy as np
import pytest
import torch

from kdflow.config.kd import Divergence
from kdflow.config.logit_cache import ValueEncoding
from kdflow.config.templates import chat
from kdflow.logit_cache.format import cache_meta
from kdflow.logit_cache.reader import LogitCache
from kdflow.logit_cache.topk import chunk_positions, encode_row, head_of, hf_topk
from kdflow.logit_cache.writer import capture_shards
from kdflow.training.tiny_models import QWEN25_VOCAB_ROWS, large_vocab_tokenizer, qwen2_model

torch.set_num_threads(1)
K = 20
SHAPE = dict(layers=2, hidden=128, heads=2, kv_heads=1, intermediate=256)  # head dim 64, 151,936 rows


def problem(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randrange(100), rng.randrange(100), rng.randrange(10)
    return (
        f"Tom has {a} apples and buys {b} more, then gives away {c}. How many are left?",
        f"Tom has {a} + {b} = {a + b} apples.\nHe gives away {c}: {a + b} - {c} = {a + b - c}.\n#### {a + b - c}",
    )


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(1)
    return large_vocab_tokenizer(["\n".join(problem(rng)) for _ in range(200)], vocab_size=2000, synthetic_lines=300)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    model = qwen2_model(tokenizer, seed=0, **SHAPE).eval()
    # Random weights give near-uniform distributions over 151,936 ids; a scaled head gives a peaked top-k that
    # still leaves part of the mass in the tail (logits' std ~2 nats).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def rows_of(tokenizer, n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        row = chat(*problem(rng))
        out.append(encode_row(tokenizer, f"row-{i:03d}", row["prompt"], row["completion"]))
    return out


def dense_logprobs(model, row) -> torch.Tensor:
    """(L, V) float64 log-softmax at the row's answer positions: one unpadded sequence, the model's own forward."""
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(row.input_ids)[None]).logits[0]
    return torch.log_softmax(logits[row.start : len(row.input_ids) - 1].double(), dim=-1)


def assert_matches_dense(model, rows, captured, atol: float):
    for row, top in zip(rows, captured):
        ref = dense_logprobs(model, row)
        assert top.ids.shape == (len(ref), K) and top.logprobs.dtype == np.float32
        got = torch.from_numpy(top.logprobs).double()
        # the k largest, in order, and each value its id's log-prob
        assert torch.allclose(got, ref.topk(K, dim=-1).values, atol=atol)
        assert torch.allclose(got, ref.gather(1, torch.from_numpy(top.ids)), atol=atol)
        rest = ref.scatter(1, ref.topk(K, dim=-1).indices, -torch.inf).logsumexp(-1)  # log Σ_{not top-k} p
        # the tail's mass, exact up to the float32 rounding of two logsumexps (topk_of_logits)
        assert torch.allclose(torch.from_numpy(top.tail).double().exp(), rest.exp(), atol=10 * atol)
    assert rest.exp().mean() > 1e-3  # tails worth checking, not all at the floor


def test_capture_at_151936_ids_equals_the_dense_log_softmax(teacher, tokenizer):
    assert teacher.config.vocab_size == QWEN25_VOCAB_ROWS and head_of(teacher) is not None
    rows = rows_of(tokenizer, 6)
    # a small token budget: several batches, each padded to its longest row
    assert_matches_dense(
        teacher, rows, hf_topk(teacher, rows, K, batch_tokens=200, pad_id=tokenizer.pad_token_id), atol=1e-5
    )


def test_only_answer_positions_reach_the_head_and_at_most_a_chunk_at_a_time(teacher, tokenizer):
    rows = rows_of(tokenizer, 40, seed=2)
    seen = []
    hook = teacher.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    try:
        hf_topk(teacher, rows, K, batch_tokens=4096, pad_id=tokenizer.pad_token_id)
    finally:
        hook.remove()
    answer_positions = sum(len(r.input_ids) - 1 - r.start for r in rows)
    step = chunk_positions(QWEN25_VOCAB_ROWS)
    assert answer_positions > step  # more than one chunk in the batch
    assert all(len(s) == 2 and s[0] <= step and s[1] == QWEN25_VOCAB_ROWS for s in seen)
    assert sum(s[0] for s in seen) == answer_positions  # never a prompt or padding position


def test_a_bfloat16_teacher_captures_in_bfloat16_with_float32_log_probs(teacher, tokenizer):
    """The decoder and head run in bf16; the log-softmax of each chunk in float32. Against the same bf16 weights
    run in float32: the values agree within 0.25 nat (bf16 logits near |z| = 8 are rounded to steps of 1/32;
    measured max 0.09 here) and the top-1 id is the float32 model's, or within that of its log-prob."""
    bf16 = qwen2_model(tokenizer, seed=0, **SHAPE).eval()
    bf16.load_state_dict(teacher.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    rows = rows_of(tokenizer, 4, seed=3)
    reference = qwen2_model(tokenizer, seed=0, **SHAPE).eval()
    reference.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})  # the bf16 weights, in float32
    captured = hf_topk(bf16, rows, K, pad_id=tokenizer.pad_token_id)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    for row, top in zip(rows, captured):
        ref = dense_logprobs(reference, row)
        assert top.logprobs.dtype == np.float32
        at_ids = ref.gather(1, torch.from_numpy(top.ids))
        assert torch.allclose(torch.from_numpy(top.logprobs).double(), at_ids, atol=0.25)
        assert (at_ids[:, 0] >= ref.max(-1).values - 0.25).all()


def test_logits_with_a_transform_of_their_own_come_from_the_models_forward(tokenizer):
    """Gemma 2 soft-caps its logits: the head alone would give other log-probs, so hf_topk uses the forward."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        final_logit_softcapping=0.5,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Gemma2ForCausalLM(config).eval()
    assert head_of(model) is None
    rows = rows_of(tokenizer, 3)
    assert_matches_dense(model, rows, hf_topk(model, rows, K, pad_id=tokenizer.pad_token_id), atol=1e-5)


def test_an_offline_kd_student_trains_from_a_151936_id_cache(teacher, tokenizer, tmp_path):
    from kdflow.config.training import trainer_config
    from kdflow.training.offline_kd import OfflineKDConfig, train_offline_kd

    rows = rows_of(tokenizer, 24, seed=4)
    meta = cache_meta(
        teachers=[{"model": "qwen2-small", "revision": None, "weight": 1.0}],
        tokenizer=tokenizer,
        vocab_size=QWEN25_VOCAB_ROWS,
        k=K,
        temperature=1.0,
        encoding=ValueEncoding.u8,
        source="hf",
    )
    capture_shards(
        tmp_path / "cache",
        [r.row_id for r in rows],
        8,
        meta,
        lambda idx: hf_topk(teacher, [rows[i] for i in idx], K, pad_id=tokenizer.pad_token_id),
    )
    cache = LogitCache.open(tmp_path / "cache", expect_tokenizer=tokenizer, expect_vocab_size=QWEN25_VOCAB_ROWS)
    assert int(cache[rows[0].row_id].ids.max()) < QWEN25_VOCAB_ROWS and cache.manifest["id_bytes"] == 3
    student = qwen2_model(tokenizer, seed=1, layers=1, hidden=64, heads=1, kv_heads=1, intermediate=128)
    training = {
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "max_length": 128,
    }
    history = train_offline_kd(
        student,
        tokenizer,
        None,
        trainer_config(
            training,
            tmp_path / "out",
            0,
            None,
            OfflineKDConfig,
            logit_cache=str(cache.folder),
            divergence=Divergence.forward_kl,
            alpha=0.5,
        ),
        tmp_path / "out",
    )
    kd = [h["kd_loss"] for h in history if "kd_loss" in h]
    assert len(kd) == 6 and all(np.isfinite(kd)) and kd[-1] < kd[0]
    assert (tmp_path / "out" / "model" / "config.json").is_file()
