"""The logit-cache format: encodings, rebuilt distributions, lookup by row id, safety checks, crash resume
and ensemble merges. Fast: synthetic distributions and a tiny untrained Llama, no server."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kdflow.config.logit_cache import ValueEncoding
from kdflow.config.templates import chat
from kdflow.logit_cache.ensemble import merge_caches, merge_topk
from kdflow.logit_cache.format import (
    CacheMismatch,
    CorruptShard,
    TopK,
    cache_meta,
    decode_ids,
    decode_values,
    encode_ids,
    encode_values,
    id_bytes_for,
    kl_full_vs_cache,
    rebuild_logprobs,
    shard_name,
)
from kdflow.logit_cache.reader import LogitCache
from kdflow.logit_cache.topk import encode_row, hf_topk
from kdflow.logit_cache.writer import capture_shards
from kdflow.training.tiny_models import CHAT_TEMPLATE, llama_model, train_tokenizer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [f"Solve step by step: {a}+{b}\n{a}+{b}={a + b}\nAnswer: {a + b}" for a in range(10) for b in range(10)]
    return train_tokenizer(corpus, 48)


@pytest.fixture(scope="module")
def model(tokenizer):
    return llama_model(tokenizer, hidden=64, layers=1, heads=2, intermediate=128, seed=0).eval()


def rows_of(tokenizer, n: int):
    rng = random.Random(0)
    rows = []
    for i in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        steps = " ".join(f"{a}+{b}" for _ in range(rng.randrange(1, 4)))
        row = chat(f"Solve step by step: {a}+{b}", f"{steps}={a + b}\nAnswer: {a + b}")
        rows.append(encode_row(tokenizer, f"train-{i:04d}", row["prompt"], row["completion"]))
    return rows


def meta_for(tokenizer, model, k, encoding=ValueEncoding.fp16):
    return cache_meta(
        teachers=[{"model": "tiny", "revision": None, "weight": 1.0}],
        tokenizer=tokenizer,
        vocab_size=model.config.vocab_size,
        k=k,
        temperature=1.0,
        encoding=encoding,
        source="hf",
    )


def write_cache(folder, tokenizer, model, rows, k, encoding=ValueEncoding.fp16, shard_rows=16):
    meta = meta_for(tokenizer, model, k, encoding)
    return capture_shards(
        folder, [r.row_id for r in rows], shard_rows, meta, lambda idx: hf_topk(model, [rows[i] for i in idx], k)
    )


def full_logprobs(model, row) -> torch.Tensor:
    """(L, V) log-softmax at the row's stored positions, one sequence at a time (no batching, no padding)."""
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(row.input_ids)[None]).logits[0]
    return torch.log_softmax(logits[row.start : len(row.input_ids) - 1].float(), dim=-1)


@pytest.mark.parametrize("vocab, width", [(200, 1), (64_000, 2), (151_936, 3), (20_000_000, 4)])
def test_ids_round_trip_at_the_smallest_width(vocab, width):
    assert id_bytes_for(vocab) == width
    ids = np.random.default_rng(0).integers(0, vocab, size=(7, 5))
    ids[0, 0] = vocab - 1
    blob = encode_ids(ids, width)
    assert len(blob) == ids.size * width
    assert np.array_equal(decode_ids(blob, width, 5), ids)


def test_value_encodings_keep_their_stated_error():
    lp = -np.random.default_rng(0).exponential(3.0, size=(50, 20)).astype(np.float32)
    lp = np.clip(lp, -21.0, 0.0)
    u8 = decode_values(encode_values(lp, ValueEncoding.u8), ValueEncoding.u8, 20)
    assert np.abs(u8 - lp).max() <= 1 / 24 + 1e-6
    fp16 = decode_values(encode_values(lp, ValueEncoding.fp16), ValueEncoding.fp16, 20)
    assert np.abs(fp16 - lp).max() <= 21 * 2**-11
    assert len(encode_values(lp, ValueEncoding.u8)) == lp.size
    shuffled = lp[:, np.random.default_rng(1).permutation(20)]  # differences wrap mod 256: any order is exact
    assert np.array_equal(
        decode_values(encode_values(shuffled, ValueEncoding.u8), ValueEncoding.u8, 20),
        u8[:, np.random.default_rng(1).permutation(20)],
    )


def test_capture_matches_the_full_softmax(tmp_path, tokenizer, model):
    rows = rows_of(tokenizer, 12)
    V = model.config.vocab_size
    write_cache(tmp_path / "full", tokenizer, model, rows, k=V)  # every token kept: only fp16 rounding differs
    write_cache(tmp_path / "top8", tokenizer, model, rows, k=8, encoding=ValueEncoding.u8)
    full_cache, top8 = LogitCache.open(tmp_path / "full"), LogitCache.open(tmp_path / "top8")
    for row in rows:
        full = full_logprobs(model, row)
        got = full_cache[row.row_id]
        assert torch.equal(got.input_ids, torch.from_numpy(row.input_ids))
        rebuilt = rebuild_logprobs(got.ids, got.logprobs, got.tail, V)
        assert (rebuilt - full).abs().max() < 4e-3  # fp16: 2^-11 relative on |log p| <= ~5
        small = top8[row.row_id]
        assert torch.equal(small.ids, full.topk(8, dim=-1).indices)  # batched capture = one-by-one forward
        # The tail is the exact mass outside the top-8 (fp16-rounded log).
        rest = torch.logsumexp(full.scatter(-1, small.ids, float("-inf")), dim=-1)
        assert torch.allclose(small.tail, rest, atol=2e-3 * rest.abs().max().item())
        # u8 log-probs within 1/24 nat of the truth, and the rebuilt distribution near the ideal top-8 one.
        assert (small.logprobs - full.gather(-1, small.ids)).abs().max() <= 1 / 24 + 1e-3
        kl = kl_full_vs_cache(full, rebuild_logprobs(small.ids, small.logprobs, small.tail, V))
        ideal = kl_full_vs_cache(full, rebuild_logprobs(small.ids, full.gather(-1, small.ids), rest, V))
        assert (kl - ideal).max() < 2e-3 and kl.min() >= -1e-6


def test_stored_positions_are_the_completion_tokens_trl_trains_on(tokenizer):
    from trl.data_utils import _tokenize, common_prefix_length

    row = chat("Solve step by step: 3+4", "3+4=7\nAnswer: 7")
    enc = encode_row(tokenizer, "r", row["prompt"], row["completion"])
    prompt_ids = _tokenize(tokenizer, row["prompt"], add_generation_prompt=True)["input_ids"]
    full = _tokenize(tokenizer, row["prompt"] + row["completion"])["input_ids"]
    assert enc.input_ids.tolist() == full
    assert enc.start == common_prefix_length(prompt_ids, full) - 1
    completion = tokenizer.decode(enc.input_ids[enc.start + 1 :])
    assert completion == "3+4=7\nAnswer: 7<|end|>"


def test_lookup_by_row_id_survives_shuffling_and_epochs(tmp_path, tokenizer, model):
    rows = rows_of(tokenizer, 40)
    write_cache(tmp_path / "c", tokenizer, model, rows, k=4, shard_rows=16)  # 3 shards, several row groups
    cache = LogitCache.open(tmp_path / "c", expect_tokenizer=tokenizer)
    expected = {r.row_id: r for r in rows}
    streamed = [r.row_id for r in cache.iter_rows()]
    assert streamed == [r.row_id for r in rows] and len(cache) == 40
    order = list(expected)
    for epoch in range(3):
        random.Random(epoch).shuffle(order)
        for row_id in order:
            got = cache[row_id]
            assert got.row_id == row_id
            assert torch.equal(got.input_ids, torch.from_numpy(expected[row_id].input_ids))
            assert got.positions[0].item() == expected[row_id].start
            assert got.ids.shape == (len(expected[row_id].input_ids) - 1 - expected[row_id].start, 4)
    with pytest.raises(KeyError, match="train-9999"):
        cache["train-9999"]


def _read_in_child(cache, row_ids, queue):
    queue.put([cache[r].logprobs.sum().item() for r in row_ids])


@pytest.mark.parametrize("budget", [1, 2**30])  # one row group kept at a time / the whole cache
def test_random_access_is_exact_and_its_memory_bounded_by_the_read_budget(tmp_path, tokenizer, model, budget):
    import multiprocessing

    write_cache(tmp_path / "c", tokenizer, model, rows_of(tokenizer, 40), k=4, shard_rows=16)
    streamed = {r.row_id: r for r in LogitCache.open(tmp_path / "c").iter_rows()}
    cache = LogitCache.open(tmp_path / "c", read_budget_bytes=budget)
    order = list(streamed)
    random.Random(0).shuffle(order)
    for row_id in order * 2:
        got, want = cache[row_id], streamed[row_id]
        assert all(torch.equal(getattr(got, f), getattr(want, f)) for f in ("input_ids", "ids", "logprobs", "tail"))
        assert len(cache._groups) == 1 if budget == 1 else cache._group_bytes <= budget
    if budget > 1:  # 40 rows of 16-row shards in 32-row groups: 3 groups, each read from disk once
        assert len(cache._groups) == 3
    # a forked DataLoader worker inherits the open shards and must not share their file handles
    ctx, queue = multiprocessing.get_context("fork"), multiprocessing.get_context("fork").Queue()
    child = ctx.Process(target=_read_in_child, args=(cache, order[:10], queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0 and got == [streamed[r].logprobs.sum().item() for r in order[:10]]


def test_a_cache_for_another_tokenizer_template_or_vocab_is_refused(tmp_path, tokenizer, model):
    rows = rows_of(tokenizer, 4)
    write_cache(tmp_path / "c", tokenizer, model, rows, k=4)
    other = train_tokenizer(["completely different text with other merges " * 3, "zebra quartz"], 48)
    with pytest.raises(CacheMismatch, match="tokenizer mismatch"):
        LogitCache.open(tmp_path / "c", expect_tokenizer=other)
    retemplated = train_tokenizer(
        [f"Solve step by step: {a}+{b}\n{a}+{b}={a + b}\nAnswer: {a + b}" for a in range(10) for b in range(10)], 48
    )
    retemplated.chat_template = CHAT_TEMPLATE.replace("<|assistant|>", "<|assistant|>\n")
    with pytest.raises(CacheMismatch, match="chat template mismatch"):
        LogitCache.open(tmp_path / "c", expect_tokenizer=retemplated)
    with pytest.raises(CacheMismatch, match="vocab size mismatch"):
        LogitCache.open(tmp_path / "c", expect_vocab_size=model.config.vocab_size + 16)
    LogitCache.open(tmp_path / "c", expect_tokenizer=tokenizer, expect_vocab_size=model.config.vocab_size)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shard_is_detected_not_read(tmp_path, tokenizer, model, damage):
    rows = rows_of(tokenizer, 20)
    write_cache(tmp_path / "c", tokenizer, model, rows, k=4, shard_rows=10)
    shard = tmp_path / "c" / shard_name(1)
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 100]
    shard.write_bytes(bytes(data))
    cache = LogitCache.open(tmp_path / "c")
    cache["train-0003"]  # shard 0 is intact and still readable
    with pytest.raises(CorruptShard, match="shard-00001"):
        cache["train-0013"]
    with pytest.raises(CorruptShard):
        cache.verify()
    with pytest.raises(CorruptShard):
        list(cache.iter_rows())


CRASHING_CAPTURE = textwrap.dedent("""
    import os, signal, sys, json
    import numpy as np
    from pathlib import Path
    from kdflow.logit_cache.format import TopK
    from kdflow.logit_cache.writer import capture_shards

    folder, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    meta = json.loads(sys.argv[3])
    row_ids = [f"r{i:03d}" for i in range(50)]
    log = folder.parent / "computed.txt"

    def compute(indices):
        if indices[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as if the machine died
        with open(log, "a") as f:
            f.writelines(f"{row_ids[i]}\\n" for i in indices)
        return [fake_row(row_ids[i], i) for i in indices]

    def fake_row(row_id, i):
        rng = np.random.default_rng(i)
        n = 6 + i % 5
        lp = np.sort(np.log(rng.dirichlet(np.ones(8))))[::-1][:3].astype(np.float32)
        L = n - 3
        return TopK(row_id, np.arange(n), 2, np.tile([1, 2, 3], (L, 1)), np.tile(lp, (L, 1)),
                    np.full(L, np.log1p(-np.exp(lp).sum()), dtype=np.float32))

    capture_shards(folder, row_ids, 8, meta, compute)
""")


def test_sigkill_mid_capture_then_rerun_completes_without_duplicates(tmp_path, tokenizer, model):
    meta = meta_for(tokenizer, model, k=3)
    folder = tmp_path / "c"
    args = [sys.executable, "-c", CRASHING_CAPTURE, str(folder), None, json.dumps(meta)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([*args[:4], "24", args[5]], env=env, capture_output=True)  # dies computing shard 3
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert not (folder / "cache.json").exists()
    assert sorted(p.name for p in folder.glob("shard-*.parquet")) == [shard_name(i) for i in range(3)]
    done = subprocess.run([*args[:4], "-1", args[5]], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    computed = (tmp_path / "computed.txt").read_text().split()
    assert len(computed) == 50 and len(set(computed)) == 50  # shards 0-2 were not recomputed
    cache = LogitCache.open(folder)
    cache.verify()
    streamed = [r.row_id for r in cache.iter_rows()]
    assert streamed == [f"r{i:03d}" for i in range(50)]
    assert cache.manifest["rows"] == 50  # and nothing else is left in the folder: no sidecars, no .part files
    assert sorted(p.name for p in folder.iterdir()) == ["cache.json", *(shard_name(i) for i in range(7))]


def test_ensemble_merge_is_the_weighted_mean_of_probabilities():
    # V = 5, k = 2. Teacher A: p = [.5, .3, | rest .2 over 3 ids]; teacher B: p = [.6 (id 1), .2 (id 3) | .2].
    a = TopK(
        "r",
        np.arange(3),
        1,
        np.array([[0, 1]]),
        np.log(np.array([[0.5, 0.3]], np.float32)),
        np.log(np.array([0.2], np.float32)),
    )
    b = TopK(
        "r",
        np.arange(3),
        1,
        np.array([[1, 3]]),
        np.log(np.array([[0.6, 0.2]], np.float32)),
        np.log(np.array([0.2], np.float32)),
    )
    merged = merge_topk([a, b], [3.0, 1.0], vocab_size=5, k=2)
    pa = np.array([0.5, 0.3, 0.2 / 3, 0.2 / 3, 0.2 / 3])
    pb = np.array([0.2 / 3, 0.6, 0.2 / 3, 0.2, 0.2 / 3])
    mean = 0.75 * pa + 0.25 * pb  # [.3917, .375, .0667, .1, .0667]
    assert merged.ids.tolist() == [[0, 1]]
    assert np.allclose(np.exp(merged.logprobs), [mean[[0, 1]]], atol=1e-6)
    assert math.isclose(float(np.exp(merged.tail[0])), 1 - mean[0] - mean[1], abs_tol=1e-6)


def test_merge_caches_streams_two_teachers_into_one(tmp_path, tokenizer, model):
    rows = rows_of(tokenizer, 10)
    other = llama_model(tokenizer, hidden=64, layers=1, heads=2, intermediate=128, seed=1).eval()
    write_cache(tmp_path / "a", tokenizer, model, rows, k=6)
    write_cache(tmp_path / "b", tokenizer, other, rows, k=6)
    caches = [LogitCache.open(tmp_path / "a"), LogitCache.open(tmp_path / "b")]
    merge_caches(caches, [1.0, 1.0], tmp_path / "ab", k=6)
    merged = LogitCache.open(tmp_path / "ab", expect_tokenizer=tokenizer)
    assert merged.manifest["source"] == "ensemble" and len(merged.manifest["teachers"]) == 2
    V = model.config.vocab_size
    for row in rows[:3]:
        a, b, got = caches[0][row.row_id], caches[1][row.row_id], merged[row.row_id]
        dense = [rebuild_logprobs(c.ids, c.logprobs, c.tail, V).exp() for c in (a, b)]
        mean = ((dense[0] + dense[1]) / 2).log()  # the hand-made mean of the two cached distributions
        assert torch.allclose(got.logprobs, mean.topk(6, dim=-1).values, atol=4e-3)  # fp16 on |log p| ~ 4
        assert torch.allclose(got.logprobs, mean.gather(-1, got.ids), atol=4e-3)
        assert torch.allclose(got.tail.exp(), 1 - mean.gather(-1, got.ids).exp().sum(-1), atol=2e-3)


def test_a_near_certain_teacher_keeps_a_nonzero_tail():
    """When the top-k hold all but ~1e-20 of the mass, the tail is floored, not zero: every token keeps some
    probability in the rebuilt distribution, so KL(teacher ‖ cache) stays finite (and tiny)."""
    from kdflow.logit_cache.format import TAIL_FLOOR, tail_from_topk
    from kdflow.logit_cache.topk import topk_of_logits

    logits = torch.full((3, 10), -40.0)
    logits[:, 0] = 10.0
    ids, values, tail = topk_of_logits(logits, 8, 1.0)
    assert (tail >= TAIL_FLOOR).all() and torch.isfinite(tail).all()
    full = torch.log_softmax(logits, -1)
    kl = kl_full_vs_cache(full, rebuild_logprobs(ids, values, tail, 10))
    assert torch.isfinite(kl).all() and kl.max() < 1e-6
    assert (tail_from_topk(np.zeros((2, 1), np.float32)) == TAIL_FLOOR).all()


def test_the_capture_settings_file_is_written_whole_and_a_torn_one_is_named(tmp_path, tokenizer, model, monkeypatch):
    """capture.json says which settings a capture in progress was made with: it is written under a temporary name and
    renamed (never torn by a crash), and a torn one from an older writer is an error naming the folder to delete."""
    import kdflow.logit_cache.writer as writer

    rows = rows_of(tokenizer, 4)
    written = []
    real = writer.write_atomic
    monkeypatch.setattr(writer, "write_atomic", lambda path, text: written.append(path.name) or real(path, text))
    write_cache(tmp_path / "c", tokenizer, model, rows, k=3)
    assert written == ["capture.json"] and not (tmp_path / "c" / "capture.json").exists()  # removed when complete

    folder = tmp_path / "torn"
    folder.mkdir()
    (folder / "capture.json").write_text('{"format": "kdflow-logit-ca')
    with pytest.raises(ValueError, match=rf"{folder / 'capture.json'} is damaged .*delete {folder}"):
        write_cache(folder, tokenizer, model, rows, k=3)
