"""kdflow/logit_cache/distillkit.py, DistillKit's layout (also the reference benchmarks/logit_cache_bytes.py sizes
kdflow's cache against): bit-packed ids and polynomial log-probs, checked against its own byte count and on closed
forms; delta encoding, residual bins and normalised t on a closed form each."""

import numpy as np
import pytest
import torch

from kdflow.logit_cache import distillkit as dk


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
    assert back[0, 0].item() == torch.tensor(-0.3).to(torch.bfloat16).float().item()
    assert torch.allclose(back[0, 1:], torch.from_numpy(logprobs[0, 1:]), atol=1e-4)


def test_unsorted_input_is_stored_best_first():
    logprobs = np.array([[-3.0, -0.5, -2.0] + [-5.0 - i for i in range(47)]], dtype=np.float32)
    ids = np.arange(50)[None]
    back_ids, back = dk.decode(*dk.encode(ids, logprobs, dk.BUDGET, 1_000), dk.BUDGET, 1_000)
    assert back_ids[0, :3].tolist() == [1, 2, 0] and back[0, 0].item() == pytest.approx(-0.5, abs=1e-2)


def test_the_lossless_layout_returns_u8_steps_and_fp16_values_exactly():
    rng = np.random.default_rng(1)
    steps = np.sort(rng.integers(0, 256, (64, 20)), -1)
    u8 = (steps / -12.0).astype(np.float32)  # kdflow's u8 grid, down to -21.25
    ids = np.stack([rng.choice(49_152, 20, replace=False) for _ in range(64)])
    back_ids, back = dk.decode(*dk.encode(ids, u8, dk.lossless(20), 49_152), dk.lossless(20), 49_152)
    assert np.array_equal(back_ids.numpy(), ids)
    assert np.array_equal(np.rint(-back.numpy() * 12), steps)
    fp16 = u8.astype(np.float16).astype(np.float32) - 0.01
    _, back = dk.decode(*dk.encode(ids, fp16, dk.lossless(20), 49_152), dk.lossless(20), 49_152)
    assert np.array_equal(back.numpy(), fp16.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize(
    "layout",
    [
        dk.Layout(k=8, exact_k=2, exact_dtype="float32", terms=(0, 1), delta_encoding=True),
        dk.Layout(k=8, exact_k=1, exact_dtype="float32", terms=(0, 1), normalize_t=True),
        dk.Layout(
            k=8,
            exact_k=1,
            exact_dtype="float32",
            terms=(0,),
            residual_bins=(dk.Bin("float32", 8, 4), dk.Bin("float16", 3, 3)),
        ),
    ],
    ids=["delta", "normalize_t", "residual_bins"],
)
def test_each_config_field_decodes_as_distillkit_defines_it(layout):
    """A line (a + b·t) is fitted exactly, with or without deltas (a line's deltas are a constant and a step) and
    over t in [0, 1]; residual bins leave at most half a quantisation step per value."""
    t = np.arange(8)
    line = np.where(t < 1, -0.2, -1.0 - 0.5 * t)[None].astype(np.float32)
    values, packed = dk.encode(np.arange(8)[None], line, layout, 64)
    assert values.shape[1] == layout.value_bytes()
    _, back = dk.decode(values, packed, layout, 64)
    if not layout.residual_bins:
        assert torch.allclose(back, torch.from_numpy(line), atol=1e-5)
    else:
        residual = torch.from_numpy(line) - back
        assert residual.abs().max() < 0.5 * 3.5 / 4  # the 3-bit bin: scale max|r| / 4, error at most half of it


def test_distillkits_config_file_round_trips_with_its_defaults():
    config = dk.config_of(dk.BUDGET, 151_936)
    assert config["polynomial_terms"] == [0, 1, "sqrt"] and config["d"] == 151_936
    assert dk.layout_of(config) == (dk.BUDGET, 151_936)
    # DistillKit's defaults for fields a config leaves out: float32 values, delta encoding on
    layout, _ = dk.layout_of({"d": 10, "k": 4, "exact_k": 4, "residual_bins": []})
    assert layout.exact_dtype == "float32" and layout.delta_encoding
    with pytest.raises(ValueError, match="polynomial_terms or residual_bins"):
        dk.layout_of({"d": 10, "k": 4, "exact_k": 1, "residual_bins": []})
