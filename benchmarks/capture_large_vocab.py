"""Capture at Qwen2.5's vocabulary (151,936 rows): the teacher's top-k with ``hf_topk`` vs its plain forward.

Teacher: Qwen2-architecture, Qwen2.5-0.5B's width (hidden 896, 14 : 2 heads, intermediate 4864, tied 151,936-row
embedding) with ``--layers`` of its 24 layers (default 4: the LM head, whose cost capture shares with the
forward, then weighs more than in the full model, so top-k's share is larger — a harder test), random weights
(head scaled so distributions are peaked), saved in ``--dtype`` (default bfloat16) and loaded in it. Tokenizer:
``large_vocab_tokenizer`` on GSM8K train + synthetic words (151,665 tokens). Rows: GSM8K test questions with
their gold answers, teacher-forced, k = 50.

1. tokens/s: the plain forward (``model(ids, mask, logits_to_keep=<from the batch's first answer position>)``:
   the logits capture needs, which is what capture ran before it chunked) vs capture (``hf_topk`` + writing
   u8 shards, as the logit_cache stage does), the same rows and batches (``--batch-tokens``); each side in a
   fresh process, alternating, ``--reps`` each, median; each process's peak RSS too.
2. peak RSS of a capture of N and 10 N rows (the N rows ten times, under new row ids: the same lengths, since
   the peak follows the longest sequence in a batch), each in a fresh process: the whole process's, and over
   the RSS with the model loaded (VmHWM reset after loading).

One torch thread unless ``BENCH_THREADS`` says otherwise: on this shared 2-core machine two threads' barriers
stall behind other jobs and both sides ran several times slower.

Prints the figures, then, last, one JSON line: ``throughput_ratio`` (capture / forward tokens/s, goal >= 0.9)
and ``memory_ratio_10n_vs_n`` (peak RSS over the loaded model, 10 N / N: goal ~ 1, flat).

    python benchmarks/capture_large_vocab.py [--rows 8] [--reps 3] [--layers 4] [--dtype bfloat16]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import options, save

GSM8K = ROOT / "data" / "gsm8k"
K, SHARD_ROWS = 50, 1024
HEAD_SCALE = 8.0  # random weights give near-uniform distributions over 151,936 ids; scaled, logits' std is ~2


def build(folder: Path, layers: int, dtype: str) -> dict:
    """The tokenizer and the teacher, saved to ``folder`` (reloads with the same ids: save_qwen2 checks)."""
    import torch

    from kdflow.training.tiny_models import QWEN25_05B, count_params, large_vocab_tokenizer, qwen2_model, save_qwen2

    texts = [r["question"] + "\n" + r["answer"] for r in map(json.loads, (GSM8K / "train.jsonl").open())]
    start = time.perf_counter()
    tokenizer = large_vocab_tokenizer(texts)
    tokenizer_s = time.perf_counter() - start
    model = qwen2_model(tokenizer, QWEN25_05B, seed=0, layers=layers)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    save_qwen2(folder, model.to(getattr(torch, dtype)), tokenizer)
    return {
        "tokens": len(tokenizer),
        "vocab_rows": model.config.vocab_size,
        "params": count_params(model),
        "tokenizer_s": round(tokenizer_s, 1),
    }


def load(folder: Path, rows: int, dtype: str, repeat: int = 1):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdflow.config.templates import chat
    from kdflow.logit_cache.topk import EncodedRow, encode_row

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    records = [json.loads(line) for line in (GSM8K / "test.jsonl").open()][:rows]
    encoded = []
    for i, r in enumerate(records):
        c = chat(r["question"], r["answer"])
        encoded.append(encode_row(tokenizer, f"test-{i:05d}", c["prompt"], c["completion"]))
    # The same rows again under new row ids: 10 N rows with N's lengths, so that the peak compares row counts,
    # not the longest sequence each sample happens to hold (attention's memory grows with it).
    encoded = [EncodedRow(f"{r.row_id}-{j}", r.input_ids, r.start) for j in range(repeat) for r in encoded]
    return model, tokenizer, encoded


def plain_forward(model, rows, batch_tokens: int, pad_id: int) -> None:
    import torch

    from kdflow.logit_cache.topk import length_batches, padded_batch

    with torch.inference_mode():
        for batch in length_batches([len(r.input_ids) for r in rows], batch_tokens):
            ids, mask = padded_batch(rows, batch, pad_id)
            first = min(rows[i].start for i in batch)
            model(input_ids=ids, attention_mask=mask, logits_to_keep=torch.arange(first, ids.shape[1] - 1)).logits


def meta_of(model, tokenizer) -> dict:
    """The cache's settings: hashing a 151,665-token tokenizer takes ~1 s, once per capture (the stage's setup)."""
    from kdflow.config.logit_cache import ValueEncoding
    from kdflow.logit_cache.format import cache_meta

    return cache_meta(
        teachers=[{"model": "qwen2-bench", "revision": None, "weight": 1.0}],
        tokenizer=tokenizer,
        vocab_size=model.config.vocab_size,
        k=K,
        temperature=1.0,
        encoding=ValueEncoding.u8,
        source="hf",
    )


def capture(model, tokenizer, rows, batch_tokens: int, folder: Path, meta: dict) -> dict:
    from kdflow.logit_cache.topk import hf_topk
    from kdflow.logit_cache.writer import capture_shards

    return capture_shards(
        folder,
        [r.row_id for r in rows],
        SHARD_ROWS,
        meta,
        lambda idx: hf_topk(model, [rows[i] for i in idx], K, 1.0, batch_tokens, tokenizer.pad_token_id),
    )


def status_kib(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def child(side: str, folder: Path, rows: int, batch_tokens: int, dtype: str, repeat: int) -> dict:
    """One side in this (fresh) process: a warm-up batch, then the timed pass; peak RSS over the loaded model."""
    model, tokenizer, encoded = load(folder, rows, dtype, repeat)
    pad = tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as tmp:
        if side == "forward":
            run = lambda: plain_forward(model, encoded, batch_tokens, pad)
            plain_forward(model, encoded[:4], batch_tokens, pad)
        else:
            meta = meta_of(model, tokenizer)
            run = lambda: capture(model, tokenizer, encoded, batch_tokens, Path(tmp) / "cache", meta)
            capture(model, tokenizer, encoded[:4], batch_tokens, Path(tmp) / "warm", meta)
        loaded = status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak from here on
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    tokens = sum(len(r.input_ids) for r in encoded)
    answer = sum(len(r.input_ids) - 1 - r.start for r in encoded)
    return {
        "side": side,
        "rows": len(encoded),
        "tokens": tokens,
        "answer_tokens": answer,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "loaded_mib": loaded / 1024,
        "peak_mib": status_kib("VmHWM") / 1024,
        "peak_over_loaded_mib": (status_kib("VmHWM") - loaded) / 1024,
    }


# glibc serves allocations below its (self-raising, up to 32 MiB) mmap threshold from the heap, which the
# batches' varying shapes fragment: RSS creeps up over many batches. Mapping every allocation >= 1 MiB afresh
# keeps it flat, at the price of page-faulting each chunk anew; the memory runs are made both ways.
FLAT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def fresh(side: str, folder: Path, rows: int, batch_tokens: int, dtype: str, repeat: int = 1, env=None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--folder",
        str(folder),
        "--rows",
        str(rows),
        "--batch-tokens",
        str(batch_tokens),
        "--dtype",
        dtype,
        "--repeat",
        str(repeat),
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    )
    if out.returncode != 0:
        raise RuntimeError(f"{side} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if "--child" in sys.argv:
        args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
        print(
            json.dumps(
                child(
                    args["--child"],
                    Path(args["--folder"]),
                    int(args["--rows"]),
                    int(args["--batch-tokens"]),
                    args["--dtype"],
                    int(args["--repeat"]),
                )
            )
        )
        return
    opts = options(__doc__, rows=8, reps=3, layers=4, dtype="bfloat16", batch_tokens=1024)
    with tempfile.TemporaryDirectory(prefix="capture-large-vocab-") as tmp:
        folder = Path(tmp) / "teacher"
        model_info = build(folder, opts.layers, opts.dtype)
        forward, captured = [], []
        for _ in range(opts.reps):  # alternating, each side in a fresh process
            forward.append(fresh("forward", folder, opts.rows, opts.batch_tokens, opts.dtype))
            captured.append(fresh("capture", folder, opts.rows, opts.batch_tokens, opts.dtype))
        small = fresh("capture", folder, opts.rows, opts.batch_tokens, opts.dtype)
        large = fresh("capture", folder, opts.rows, opts.batch_tokens, opts.dtype, repeat=10)
        small_flat = fresh("capture", folder, opts.rows, opts.batch_tokens, opts.dtype, env=FLAT_MALLOC)
        large_flat = fresh("capture", folder, opts.rows, opts.batch_tokens, opts.dtype, repeat=10, env=FLAT_MALLOC)
    median = lambda runs, key: statistics.median(r[key] for r in runs)
    forward_tps, capture_tps = median(forward, "tokens_per_s"), median(captured, "tokens_per_s")
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {os.environ.get('BENCH_THREADS', '1')}",
        "teacher": {**model_info, "hidden": 896, "layers": opts.layers, "heads": "14:2", "dtype": opts.dtype},
        "k": K,
        "rows": opts.rows,
        "batch_tokens": opts.batch_tokens,
        "tokens": forward[0]["tokens"],
        "answer_tokens": forward[0]["answer_tokens"],
        "forward_tokens_per_s": forward_tps,
        "capture_tokens_per_s": capture_tps,
        "forward_peak_over_loaded_mib": median(forward, "peak_over_loaded_mib"),
        "capture_peak_over_loaded_mib": median(captured, "peak_over_loaded_mib"),
        "memory": {"n": small, "10n": large, "n_mmap_1mib": small_flat, "10n_mmap_1mib": large_flat},
        "throughput_ratio": capture_tps / forward_tps,
        "memory_ratio_10n_vs_n": large["peak_over_loaded_mib"] / small["peak_over_loaded_mib"],
        "total_peak_ratio_10n_vs_n": large["peak_mib"] / small["peak_mib"],
        "memory_ratio_10n_vs_n_mmap_1mib": large_flat["peak_over_loaded_mib"] / small_flat["peak_over_loaded_mib"],
    }
    t = result["teacher"]
    print(
        f"teacher: Qwen2 hidden 896, {t['layers']} layers, 14:2 heads, vocabulary {t['tokens']:,} tokens in "
        f"{t['vocab_rows']:,} rows, {t['params'] / 1e6:.0f}M parameters, {t['dtype']}; k={K}; {result['machine']}"
    )
    print(
        f"rows: {opts.rows} GSM8K test (question + gold answer), {result['tokens']:,} tokens, "
        f"{result['answer_tokens']:,} answer positions; batches of <= {opts.batch_tokens} tokens; {opts.reps} reps"
    )
    print(
        f"  plain forward (logits from the first answer position): {forward_tps:8,.0f} tokens/s, peak "
        f"+{result['forward_peak_over_loaded_mib']:,.0f} MiB over the loaded model"
    )
    print(
        f"  capture (hf_topk + u8 shards):                         {capture_tps:8,.0f} tokens/s, peak "
        f"+{result['capture_peak_over_loaded_mib']:,.0f} MiB"
    )
    for name, r in (
        ("N", small),
        ("10N", large),
        ("N, MALLOC_MMAP_THRESHOLD_=1 MiB", small_flat),
        ("10N, MALLOC_MMAP_THRESHOLD_=1 MiB", large_flat),
    ):
        print(
            f"  capture of {r['rows']:5d} rows ({name}): peak RSS {r['peak_mib']:,.0f} MiB, "
            f"+{r['peak_over_loaded_mib']:,.0f} MiB over the loaded model ({r['loaded_mib']:,.0f} MiB)"
        )
    save("capture_large_vocab", result)
    print(
        json.dumps(
            {
                "throughput_ratio": round(result["throughput_ratio"], 3),
                "memory_ratio_10n_vs_n": round(result["memory_ratio_10n_vs_n"], 3),
                "memory_ratio_10n_vs_n_mmap_1mib": round(result["memory_ratio_10n_vs_n_mmap_1mib"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
