"""benchmarks/distillkit_layout.py, the reference the logit-cache benchmark sizes kdflow's cache against: DistillKit's
bit-packed ids and polynomial log-probs, checked against its own byte count and on closed forms."""

import numpy as np
import pytest
import torch

from benchmarks import distillkit_layout as dk


def test_its_byte_count_is_distillkits_formula_and_the_readme_figure_needs_16_bit_ids():
    # README "budget pick": ~114 bytes/token, which its formula gives for 16-bit ids; Qwen2.5's 151,936 take 18.
    assert dk.BUDGET.value_bytes() == 2 + 3 * 4
    assert dk.bytes_per_token(dk.BUDGET, 65_536) == 114
    assert dk.index_bits(151_936) == 18 and dk.bytes_per_token(dk.BUDGET, 151_936) == 14 + 113


@pytest.mark.parametrize("vocab", [4_096, 65_536, 151_936])
def test_packed_arrays_have_the_formulas_size_and_ids_round_trip(vocab):
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(vocab, 50, replace=False) for _ in range(9)])
    ids[0, 0] = vocab - 1  # the widest id
    logprobs = -np.sort(rng.exponential(3.0, (9, 50)), -1).astype(np.float32)
    values, packed = dk.encode(ids, logprobs, dk.BUDGET, vocab)
    assert values.shape[1] + packed.shape[1] == dk.bytes_per_token(dk.BUDGET, vocab)
    back, _ = dk.decode(values, packed, dk.BUDGET, vocab)
    assert np.array_equal(back.numpy(), ids)  # already best first: the order is kept


def test_pack_ids_is_msb_first_like_pack_to_bytes():
    # 3-bit ids 5 (101) and 3 (011) -> bit stream 101011, zero-padded: 0b10101100
    assert dk.pack_ids(np.array([[5, 3]]), 3).tolist() == [[0b10101100]]


def test_a_curve_the_polynomial_spans_is_rebuilt_and_the_top1_is_bf16():
    t = np.arange(49, dtype=np.float64)
    curve = -1.0 - 0.05 * t - 0.3 * np.sqrt(t)  # a + b·t + c·√t, decreasing
    logprobs = np.concatenate([[-0.3], curve])[None].astype(np.float32)
    ids = np.arange(50)[None]
    values, packed = dk.encode(ids, logprobs, dk.BUDGET, 151_936)
    _, back = dk.decode(values, packed, dk.BUDGET, 151_936)
    assert back[0, 0].item() == torch.tensor(-0.3).to(torch.bfloat16).item()
    assert torch.allclose(back[0, 1:], torch.from_numpy(logprobs[0, 1:]), atol=1e-4)


def test_unsorted_input_is_stored_best_first():
    logprobs = np.array([[-3.0, -0.5, -2.0] + [-5.0 - i for i in range(47)]], dtype=np.float32)
    ids = np.arange(50)[None]
    back_ids, back = dk.decode(*dk.encode(ids, logprobs, dk.BUDGET, 1_000), dk.BUDGET, 1_000)
    assert back_ids[0, :3].tolist() == [1, 2, 0] and back[0, 0].item() == pytest.approx(-0.5, abs=1e-2)
