"""The chunked head losses (kdflow/training/chunked_loss.py) against the dense ones they replace (losses.py) on
``hidden @ weight.T + bias``: values and gradients (hidden, weight, bias) for every divergence and temperature in
float64 to 1e-6, CE with ignored labels, bf16 within a stated tolerance, edge cases, and the chunking itself (no
call ever sees more than one chunk of rows)."""

import pytest
import torch

import kdflow.training.chunked_loss as chunked
from kdflow.config.kd import Divergence
from kdflow.training.chunked_loss import Teacher, chunk_rows, chunked_cross_entropy, chunked_sparse_kd_loss, head_losses
from kdflow.training.losses import IGNORE_INDEX, cross_entropy, sparse_kd_loss

N, H, V, K = 37, 16, 300, 7


def problem(dtype=torch.float64, seed=0, k=K, vocab=V):
    """Hidden states, an LM head with bias (requires grad), and a peaked teacher's top-k, tail and labels."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(vocab, H, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    bias = torch.randn(vocab, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    teacher = torch.log_softmax(3 * torch.randn(N, vocab, generator=g, dtype=torch.float64), -1)
    logprobs, ids = teacher.topk(k, -1)
    tail = torch.log1p(-logprobs.exp().sum(-1).clamp(max=1 - 1e-12))
    labels = torch.randint(0, vocab, (N,), generator=g)
    labels[::4] = IGNORE_INDEX
    return hidden, weight, bias, ids, logprobs, tail, labels


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind", list(Divergence))
def test_chunked_kd_equals_the_dense_loss_and_its_gradients_in_float64(kind, temperature):
    hidden, weight, bias, ids, logprobs, tail, _ = problem()
    mask = torch.arange(N) % 5 != 0
    dense = sparse_kd_loss(hidden @ weight.T + bias, ids, logprobs, tail, kind, temperature, mask, beta=0.3, skew=0.2)
    # 5 rows a chunk: 8 chunks, the last one short
    fused = chunked_sparse_kd_loss(
        hidden, weight, ids, logprobs, tail, kind, temperature, mask, beta=0.3, skew=0.2, bias=bias, chunk_size=5
    )
    assert fused.dtype == torch.float64 and dense.item() > 1e-3
    torch.testing.assert_close(fused, dense, rtol=0, atol=1e-6)
    for got, want in zip(grads(fused, hidden, weight, bias), grads(dense, hidden, weight, bias)):
        assert want.abs().max() > 1e-4  # a gradient that is there, not a pair of zeros
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_cross_entropy_equals_the_dense_one_with_ignored_labels(reduction):
    hidden, weight, bias, *_, labels = problem()
    dense = cross_entropy(hidden @ weight.T + bias, labels, reduction=reduction)
    fused = chunked_cross_entropy(hidden, weight, labels, bias, reduction, chunk_size=6)
    torch.testing.assert_close(fused, dense, rtol=0, atol=1e-6)
    if reduction == "none":
        assert (fused[labels == IGNORE_INDEX] == 0).all()
        fused, dense = fused.square().sum(), dense.square().sum()  # a non-uniform upstream gradient per row
    for got, want in zip(grads(fused, hidden, weight, bias), grads(dense, hidden, weight, bias)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_ce_and_kd_in_one_pass_equal_the_two_dense_losses_mixed():
    hidden, weight, bias, ids, logprobs, tail, labels = problem()
    alpha = 0.3
    ce, kd = head_losses(hidden, weight, bias, labels, Teacher(ids, logprobs, tail, Divergence.jsd, 2.0), chunk_size=7)
    fused = alpha * ce.sum() / (labels != IGNORE_INDEX).sum() + (1 - alpha) * kd.mean()
    logits = hidden @ weight.T + bias
    dense = alpha * cross_entropy(logits, labels) + (1 - alpha) * sparse_kd_loss(
        logits, ids, logprobs, tail, Divergence.jsd, 2.0
    )
    torch.testing.assert_close(fused, dense, rtol=0, atol=1e-6)
    for got, want in zip(grads(fused, hidden, weight, bias), grads(dense, hidden, weight, bias)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_bf16_hidden_and_head_stay_within_2e_2_of_the_float64_loss():
    """bf16 inputs: the logits are rounded to bf16 per chunk (as the model's own head rounds them), the softmax and
    divergence run in fp32. Stated tolerance: 2e-2 relative on the loss and 5e-2 on the gradient (bf16 has 8 bits
    of mantissa, ~4e-3 per rounding); the dense loss on the same bf16 logits lands as far from float64."""
    hidden, weight, bias, ids, logprobs, tail, labels = problem()
    exact = sparse_kd_loss(hidden @ weight.T + bias, ids, logprobs, tail, Divergence.forward_kl, 2.0)
    (exact_gh,) = grads(exact, hidden)
    h16, w16, b16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias))
    fused = chunked_sparse_kd_loss(h16, w16, ids, logprobs, tail, Divergence.forward_kl, 2.0, bias=b16, chunk_size=8)
    dense = sparse_kd_loss(h16 @ w16.T + b16, ids, logprobs, tail, Divergence.forward_kl, 2.0)
    assert fused.dtype == torch.float32
    for loss in (fused, dense):
        torch.testing.assert_close(loss.double(), exact.detach(), rtol=2e-2, atol=0)
    (gh,) = grads(fused, h16)
    assert gh.dtype == torch.bfloat16
    assert (gh.double() - exact_gh).norm() / exact_gh.norm() < 5e-2


def test_a_top_k_holding_the_whole_vocabulary_and_a_near_certain_student_stay_finite():
    hidden, weight, bias, *_ = problem(vocab=12, k=12)
    logprobs, ids = torch.log_softmax(torch.randn(N, 12, dtype=torch.float64), -1).topk(12, -1)
    tail = torch.full((N,), -30.0, dtype=torch.float64)  # a stored floor, not mass (k = V)
    for kind in Divergence:
        dense = sparse_kd_loss(hidden @ weight.T + bias, ids, logprobs, tail, kind)
        fused = chunked_sparse_kd_loss(hidden, weight, ids, logprobs, tail, kind, bias=bias, chunk_size=4)
        torch.testing.assert_close(fused, dense, rtol=0, atol=1e-6)
        assert all(torch.isfinite(g).all() for g in grads(fused, hidden, weight, bias)), kind
    # logits 200 apart: the rest's mass is exp(-200), below float32's range; its gradient must not be inf * 0
    hidden, weight, bias, ids, logprobs, tail, _ = problem(torch.float32)
    with torch.no_grad():
        bias[ids[0, 0]] += 200.0
    fused = chunked_sparse_kd_loss(hidden, weight, ids, logprobs, tail, Divergence.reverse_kl, bias=bias, chunk_size=5)
    assert torch.isfinite(fused) and all(torch.isfinite(g).all() for g in grads(fused, hidden, weight, bias))


def test_no_call_to_the_head_sees_more_than_one_chunk_of_rows(monkeypatch):
    seen = []
    original = chunked._Buffers.logits

    def recording(self, hidden, bias):
        seen.append(hidden.shape[0])
        return original(self, hidden, bias)

    monkeypatch.setattr(chunked._Buffers, "logits", recording)
    hidden, weight, bias, ids, logprobs, tail, labels = problem()
    ce, kd = head_losses(hidden, weight, bias, labels, Teacher(ids, logprobs, tail), chunk_size=10)
    (ce.sum() + kd.sum()).backward()
    assert seen == [10, 10, 10, 7] * 2  # forward, then the backward's recomputation
    assert chunk_rows(151_936) == 110 and chunk_rows(52) > 100_000  # the demo's vocabulary: one chunk


def test_mismatched_shapes_are_refused_with_the_shapes_named():
    hidden, weight, bias, ids, logprobs, tail, labels = problem()
    with pytest.raises(ValueError, match=r"weight \(16, 300\)"):
        head_losses(hidden, weight.T, bias, labels)
    with pytest.raises(ValueError, match="labels"):
        head_losses(hidden, weight, bias, labels[:-1])
    with pytest.raises(ValueError, match="teacher ids"):
        head_losses(hidden, weight, bias, teacher=Teacher(ids[:-1], logprobs[:-1], tail[:-1]))


def test_sft_on_the_chunked_head_trains_the_same_student_as_trls_default_loss(tmp_path, monkeypatch):
    """train_sft forced through the chunked head (3 rows a chunk) logs the same losses and ends at the same weights
    as TRL's own loss (which it takes when one chunk would hold every position, as here by default)."""
    from transformers import AutoModelForCausalLM

    import kdflow.training.head as head
    from kdflow.config.templates import chat
    from kdflow.config.training import trainer_config
    from kdflow.training.sft import train_sft
    from kdflow.training.tiny_models import llama_model
    from tests.logit_cache.test_capture import TEMPLATE, kept_rows, tiny_teacher

    _, tok = tiny_teacher(tmp_path / "teacher")
    rows = [chat(TEMPLATE.replace("{{ question }}", r["question"]), r["text"]) for r in kept_rows(32)]
    training = {
        "max_steps": 5,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "max_length": 64,
    }
    calls = []
    original = head.fused_head
    monkeypatch.setattr(head, "fused_head", lambda *a: calls.append(original(*a)) or calls[-1])

    def run(name):
        model = llama_model(tok, hidden=32, layers=1, heads=1, intermediate=64, seed=0)
        history = train_sft(model, tok, rows, trainer_config(training, tmp_path / name, 0), tmp_path / name)
        weights = AutoModelForCausalLM.from_pretrained(tmp_path / name / "model").state_dict()
        return [h["loss"] for h in history if "loss" in h], weights

    trl_losses, trl_weights = run("trl")
    assert calls and all(c is None for c in calls)  # TRL's loss: one chunk holds every position
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 3 * len(tok))
    calls.clear()
    ours, our_weights = run("chunked")
    assert len(calls) == 5 and all(c is not None for c in calls)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(trl_losses), rtol=1e-4, atol=1e-5)
    assert len(ours) == 5 and ours[-1] < ours[0]
    for name, value in trl_weights.items():
        torch.testing.assert_close(our_weights[name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_a_masked_row_with_a_nan_teacher_passes_no_nan_gradient_and_a_used_one_is_nan():
    """Issue 23, finding 1: ``reduce`` drops a masked row's KD value; its backward must then pass 0 for that row, not
    0 · the divergence's gradient (NaN for a NaN teacher). A NaN teacher in a row that counts makes the loss NaN."""
    hidden, weight, bias, ids, logprobs, tail, _ = problem()
    logprobs = logprobs.clone()
    logprobs[3] = float("nan")
    mask = torch.ones(N, dtype=torch.bool)
    mask[3] = False
    loss = chunked_sparse_kd_loss(hidden, weight, ids, logprobs, tail, mask=mask, bias=bias, chunk_size=5)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(x.grad).all() for x in (hidden, weight, bias))
    assert torch.isnan(chunked_sparse_kd_loss(hidden, weight, ids, logprobs, tail, bias=bias, chunk_size=5))
