"""Post-training int8 weights of a trained model — quantization, KD's sibling route to a cheaper model — saved so that
it is loaded, evaluated and measured like any other model.

On a CPU: torch's dynamic quantization (``torch.ao.quantization.quantize_dynamic``) of every ``nn.Linear``: weights
int8, one scale per matrix (per-tensor affine), activations quantized on the fly at each matmul and the results back
in float32 (so the KV cache stays float32). The embedding table stays float32 (``quantize_dynamic`` leaves
``nn.Embedding`` alone); a head tied to it gets its own int8 copy. torch marks ``torch.ao.quantization`` deprecated
in favour of torchao, but it is the CPU path with mature x86 kernels (fbgemm / onednn) in the pinned torch 2.13, and
needs nothing installed. On a GPU the equivalents are torchao's ``Int8WeightOnlyConfig`` /
``Int8DynamicActivationInt8WeightConfig`` or bitsandbytes' ``load_in_8bit``; they are not wired here (the demo runs
on a CPU).

A quantized folder holds the model's ``config.json``, its tokenizer, ``int8.pt`` (the quantized state dict, read
back with ``torch.load(weights_only=True)``: no pickled code) and ``quantization.json`` saying how it was made.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

WEIGHTS = "int8.pt"
MARKER = "quantization.json"
METHODS = ("int8",)


def _quantize_dynamic(model):
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # the deprecation notice, once per call: said once in this module's docstring
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def quantize_int8(model):
    """``model`` with every ``nn.Linear`` replaced by a dynamically quantized int8 one (on the CPU; in place)."""
    return _quantize_dynamic(model.to("cpu").eval())


def save_int8(model_dir: str, out: Path) -> dict:
    """Quantize the model saved in ``model_dir`` and save it to ``out``; returns what ``quantization.json`` says."""
    from transformers import AutoTokenizer

    from kdflow.teacher.hf_generate import load

    net, _ = load(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    net.config.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    q = quantize_int8(net)
    torch.save(q.state_dict(), out / WEIGHTS)
    info = {
        "method": "int8",
        "how": "torch.ao.quantization.quantize_dynamic(nn.Linear, qint8): int8 weights, "
        "per-tensor affine scale, activations quantized per matmul, outputs float32; embedding float32",
        "engine": torch.backends.quantized.engine,
        "torch": torch.__version__,
        "linear_layers": sum(1 for m in q.modules() if is_int8_linear(m)),
    }
    (out / MARKER).write_text(json.dumps(info, indent=2))
    return info


def is_quantized(model_dir: str) -> bool:
    return (Path(model_dir) / MARKER).is_file()


def load_int8(model_dir: str):
    """(model, tokenizer) from a folder ``save_int8`` wrote."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32).eval()
    net = quantize_int8(net)
    with warnings.catch_warnings():  # TypedStorage deprecation inside torch.load of quantized tensors
        warnings.simplefilter("ignore")
        state = torch.load(Path(model_dir) / WEIGHTS, weights_only=True)
    net.load_state_dict(state)
    return net, tokenizer


def load(model_dir: str, dtype=None):
    """Any model folder the evaluation meets: an int8 one from ``save_int8`` (its precision is its own: int8
    Linear weights, float32 elsewhere, whatever ``dtype``), else a transformers checkpoint in ``dtype``
    (a ``config.precision.Dtype``; None: float32)."""
    if is_quantized(model_dir):
        return load_int8(model_dir)
    from kdflow.teacher.hf_generate import load as load_hf

    return load_hf(model_dir, dtype)


def is_int8_linear(module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, DynamicLinear)


def count_params(model) -> int:
    """Distinct parameters, int8 matrices included (a quantized Linear keeps its weight outside ``parameters()``);
    a head tied to the embedding counts once, as in the float model it came from."""
    seen = {id(p): p.numel() for p in model.parameters()}
    int8 = sum(
        m.weight().numel() + (m.bias().numel() if m.bias() is not None else 0)
        for m in model.modules()
        if is_int8_linear(m)
    )
    tied_head = getattr(model.config, "tie_word_embeddings", False) and is_int8_linear(getattr(model, "lm_head", None))
    return sum(seen.values()) + int8 - (model.lm_head.weight().numel() if tied_head else 0)
