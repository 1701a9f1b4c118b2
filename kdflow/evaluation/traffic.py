"""Memory traffic of one generated token, and its arithmetic intensity: what decoding at batch 1 is bound by.

Decoding one token at batch 1 reads every weight matrix once and the whole KV cache once, and does ~2 FLOPs per
weight: about 0.5 FLOP per byte in float32, far below what any processor needs to be compute-bound (tens to hundreds
of FLOPs per byte). So a token's latency is bounded below by bytes / memory bandwidth, and int8 weights, which
quarter the weight bytes, speed decoding up where kernels keep up — the roofline in ``devices.py``.

Counted from the loaded model itself, at the dtype each tensor is stored in, so that an int8 model, a tied head or a
bfloat16 checkpoint need no formula of their own.
"""

from __future__ import annotations

import torch

TRAFFIC_FORMULA = (
    "bytes/token = W + 2·L·kv·hd·c·b  (W: bytes of every weight, each at its stored dtype and read "
    "once — int8 matrices 1 byte per weight, an embedding table that only serves lookups one row, a "
    "head tied to it the whole table; the K and V caches of L layers, kv heads of size hd, at c "
    "earlier positions, b bytes per cached element; activations, rotary tables and quantization "
    "scales, O(L·d) per token, left out)"
)
INTENSITY_FORMULA = "arithmetic intensity = FLOPs/token ÷ bytes/token (FLOPs per byte moved from memory)"


def _weights(model):
    """(tensor, role) of every distinct stored weight: the parameters, and the int8 matrices of dynamically quantized
    Linear layers (kept outside ``parameters()``). Buffers (rotary frequency tables, O(head dim)) are left out."""
    from kdflow.evaluation.quantize import is_int8_linear

    out: dict[int, tuple[torch.Tensor, str]] = {}
    lookup_only = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    read_whole = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}  # e.g. a tied head
    for t in model.parameters():
        role = "lookup" if id(t) in lookup_only and id(t) not in read_whole else "read"
        out.setdefault(id(t), (t, role))
    for m in model.modules():
        if is_int8_linear(m):
            for t in (m.weight(), m.bias()):
                if t is not None:
                    out.setdefault(id(t), (t, "read"))
    return list(out.values())


def weight_bytes_read(model) -> int:
    """W of the formula: bytes of weights read to produce one token."""
    total = 0
    for t, role in _weights(model):
        row = t[0] if role == "lookup" else t
        total += row.numel() * t.element_size()
    return total


def stored_weight_bytes(model) -> int:
    """Bytes of every weight and buffer as stored (what occupies memory, int8 matrices included)."""
    return sum(t.numel() * t.element_size() for t, _ in _weights(model)) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def kv_bytes_read(config, context: float, element_bytes: int) -> float:
    """2·L·kv·hd·c·b: the K and V caches of every layer at ``context`` earlier positions."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv * hd * context * element_bytes


def activation_bytes(model) -> int:
    """Bytes per element of the activations, hence of the KV cache: the float dtype the model computes in (float32
    for an int8 model: dynamic quantization returns float32 outputs)."""
    floats = [p for p in model.parameters() if p.is_floating_point()]
    return floats[0].element_size() if floats else 4


def compute_dtype(model) -> str:
    """What the matmuls run in: "int8" for a dynamically quantized model, else its weights' float dtype."""
    from kdflow.evaluation.quantize import is_int8_linear

    if any(is_int8_linear(m) for m in model.modules()):
        return "int8"
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def traffic(model, context: float, flops_per_token: int | None) -> dict:
    """Per generated token at batch 1: bytes read, the weight and KV parts of it, and the arithmetic intensity."""
    weights = weight_bytes_read(model)
    kv = kv_bytes_read(model.config, context, activation_bytes(model))
    total = round(weights + kv)
    return {
        "memory_bytes_per_token": total,
        "weight_bytes_per_token": weights,
        "kv_bytes_per_token": round(kv),
        "arithmetic_intensity": None if flops_per_token is None else round(flops_per_token / total, 4),
        "compute_dtype": compute_dtype(model),
    }
