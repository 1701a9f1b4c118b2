"""What a model costs to deploy: parameters, FLOPs per token, size on disk, peak memory, latency, throughput.

The analytic figures (parameters, FLOPs, size) depend on the model alone. The measured ones (memory,
latency, throughput) depend on the machine too, so they are only comparable between models measured back
to back in one process on one machine: ``measure_all`` does exactly that, alternating the models so a
slow moment of a busy machine does not land on one model only.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from kdflow.config.templates import plain_text, special_strings

FIGURES = "deployment.json"  # the deployment stage's output: every model's figures
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")

FLOPS_FORMULA = (
    "2·[L·(d·(h + 2·kv)·hd + h·hd·d + 3·d·f) + d·V] + 4·L·h·hd·c  "
    "(L layers, d hidden, h query heads and kv key/value heads of size hd, f MLP width, V vocabulary, "
    "c keys attended; a multiply-add is 2 FLOPs; norms, rotary, softmax and activations left out: "
    "O(L·d) per token)"
)


def flops_per_token(config, context: int) -> int:
    """Forward FLOPs to produce one token of a Llama-style decoder that attends to ``context`` keys.

    ``2·N_matmul`` for the weight matrices (q, k, v, o, the SwiGLU MLP's gate, up and down, the LM head —
    the head counts even when tied to the embedding: tying saves memory, not compute; the embedding lookup
    is free) plus ``4·L·h·hd·c`` for attention (q·kᵀ and the weighted sum of v, ``2·h·hd·c`` each per
    layer). This is Kaplan et al. (2020)'s ``2N + 2·L·c·d_attn`` with both attention products counted.
    """
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or d // heads
    mlp = getattr(config, "intermediate_size", None)
    if mlp is None:
        raise ValueError(
            f"{type(config).__name__} has no intermediate_size: the formula covers Llama-style "
            "decoders (Llama, Qwen2, Mistral) only"
        )
    per_layer = d * (heads + 2 * kv) * hd + heads * hd * d + 3 * d * mlp
    return round(2 * (layers * per_layer + d * vocab) + 4 * layers * heads * hd * context)


def size_on_disk(location: str | Path) -> int:
    """Bytes of the weight files of a saved model (tokenizer and configs left out): a local folder, or a hub
    id already in the local hub cache (it was loaded to be measured)."""
    folder = Path(location)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(location), local_files_only=True))
    # resolve(): the hub cache keeps files as links to blobs; a link's own size is not the file's
    return sum(
        f.resolve().stat().st_size for f in folder.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)
    )


def resident_bytes(model) -> int:
    from kdflow.evaluation.traffic import stored_weight_bytes

    return stored_weight_bytes(model)  # parameters and buffers, and the int8 matrices of a quantized model


def _generate(model, enc: dict, tokens: int, pad_token_id: int):
    # min_new_tokens = max_new_tokens: every model writes the same number of tokens, so a model that would
    # stop early does not look faster.
    return model.generate(
        **enc,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        top_p=None,
        top_k=None,
        temperature=None,
    )


def encode(tokenizer, prompts: list[str], device) -> dict:
    """Prompts through the chat template, left-padded (decoder-only batches end at the prompt)."""
    tokenizer.padding_side = "left"
    specials = special_strings(tokenizer)  # data text is never chat markup (templates.plain_text)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": plain_text(p, specials)}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


@torch.inference_mode()
def timed_generate(model, tokenizer, enc: dict, tokens: int) -> float:
    """Wall seconds to generate ``tokens`` new tokens for every row of ``enc``."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    _generate(model, enc, tokens, tokenizer.pad_token_id)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.inference_mode()
def peak_generation_memory(model, tokenizer, enc: dict, tokens: int) -> int:
    """Peak bytes of live tensors while generating: weights and buffers plus the KV cache and activations.

    On a GPU: ``torch.cuda.max_memory_allocated``. On a CPU, torch keeps no allocator statistics, and a
    process's RSS is dominated by the Python/torch runtime (~0.4 GB, lazily loaded code included), so the
    profiler's per-op allocation records are summed in time order instead: the peak of that running total,
    at op granularity, plus what is resident before generation starts.
    """
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(model.device)
        _generate(model, enc, tokens, tokenizer.pad_token_id)
        return torch.cuda.max_memory_allocated(model.device)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _generate(model, enc, tokens, tokenizer.pad_token_id)
    # Allocations are recorded on the op that made them (its self memory, net of what it freed itself);
    # frees outside any op appear as "[memory]" events.
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return resident_bytes(model) + sum(v.numel() * v.element_size() for v in enc.values()) + peak


def context_of(enc: dict, tokens: int) -> float:
    """Mean number of keys a generated token attends to: the prompt plus the tokens generated before it."""
    prompt = float(enc["attention_mask"].sum(dim=1).float().mean())
    return prompt + (tokens + 1) / 2


def measure_all(
    models: dict[str, tuple], prompt: str, batch_prompts: list[str], tokens: int, repeats: int, counter=None
) -> dict:
    """Back-to-back cost of each ``name -> (model, tokenizer)``: latency per token at batch 1 on ``prompt``,
    throughput at batch ``len(batch_prompts)``, each the median of ``repeats`` runs with the models
    alternating (after one warm-up run each), then peak memory at the larger batch. ``counter``: an energy counter
    (``energy.Counter``) read around every timed batch-1 run, for the measured energy per token."""
    single = {n: encode(t, [prompt], m.device) for n, (m, t) in models.items()}
    batch = {n: encode(t, batch_prompts, m.device) for n, (m, t) in models.items()}
    for name, (model, tok) in models.items():  # warm-up: first calls pay for lazy initialisation
        timed_generate(model, tok, single[name], 2)
        timed_generate(model, tok, batch[name], 2)
    latency: dict[str, list[float]] = {n: [] for n in models}
    joules: dict[str, list[float]] = {n: [] for n in models}
    throughput: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(repeats):
        for name, (model, tok) in models.items():
            before = counter.read_joules() if counter else None
            latency[name].append(timed_generate(model, tok, single[name], tokens) / tokens)
            if counter:
                joules[name].append((counter.read_joules() - before) / tokens)
            throughput[name].append(len(batch_prompts) * tokens / timed_generate(model, tok, batch[name], tokens))
    out = {}
    for name, (model, tok) in models.items():
        out[name] = {
            "latency_ms_per_token": round(1000 * statistics.median(latency[name]), 4),
            "throughput_tokens_per_s": round(statistics.median(throughput[name]), 1),
            "peak_memory_bytes": peak_generation_memory(model, tok, batch[name], tokens),
            "context": round(context_of(single[name], tokens), 1),
        }
        if counter:
            out[name] |= {
                "measured_energy_j_per_token": statistics.median(joules[name]),
                "energy_counter": counter.what,
            }
    return out


def machine() -> dict:
    """Where the measurements were made (they mean nothing without it)."""
    import os
    import platform

    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def cpu_name() -> str:
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def flops(config, context: float) -> dict:
    """FLOPs per token, or why the formula does not apply to this architecture (the other figures stand)."""
    try:
        return {"flops_per_token": flops_per_token(config, context)}
    except ValueError as e:
        return {"flops_per_token": None, "flops_skipped": str(e)}


def figures(model_dirs: dict[str, str], prompts: list[str], latency_tokens: int, repeats: int) -> tuple[dict, dict]:
    """Parameters, FLOPs/token, memory traffic/token, size on disk, peak memory, latency, throughput and (where a
    counter is readable) energy of every model, measured back to back here (timings of different runs or machines do
    not compare). ``prompts``: one throughput batch. Returns (figures per model, the energy counter used or why
    none)."""
    from kdflow.evaluation import energy
    from kdflow.evaluation.quantize import count_params, is_quantized, load
    from kdflow.evaluation.traffic import traffic

    loaded = {name: load(d) for name, d in model_dirs.items()}
    if torch.cuda.is_available():  # cost is measured on the device the models would be served from
        # int8 models (torch's dynamic quantization) have CPU kernels only: they stay on the CPU
        loaded = {
            name: (net if is_quantized(model_dirs[name]) else net.to("cuda"), tok)
            for name, (net, tok) in loaded.items()
        }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    counter, why = energy.counter_for(device)
    measured = measure_all(loaded, prompts[0], prompts, latency_tokens, repeats, counter)
    out = {}
    for name, (net, _) in loaded.items():
        if net.device.type != device:  # the counter measured another device than the one this model ran on
            measured[name].pop("measured_energy_j_per_token", None)
        fl = flops(net.config, measured[name]["context"])
        out[name] = {
            "params": count_params(net),
            **fl,
            **traffic(net, measured[name]["context"], fl["flops_per_token"]),
            "size_bytes": size_on_disk(model_dirs[name]),
            "device": net.device.type,
            **measured[name],
        }
    return out, {"counter": counter.what if counter else None, "why_not": why}
