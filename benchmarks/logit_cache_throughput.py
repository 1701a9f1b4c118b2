"""Logit-cache throughput and memory, on the text teacher of benchmarks/logit_cache_bytes.py:

1. capture (HF forward + top-k + tail + writing zstd shards) vs the same teacher's plain forward pass over
   the same batches, tokens/s, alternating, median of several repetitions; for the text teacher (hidden
   128) and a wider one (hidden 512, 4 layers), since top-k over the vocabulary is a fixed cost per token;
2. reading the cache (answer tokens/s: streamed in order, and looked up by row id in a shuffled order, as a
   training epoch does) vs what training consumes: answer tokens/s of the demo-sized student (hidden 64,
   2 layers) taking optimizer steps on the same sequences, batch 64;
3. peak RSS of a capture of N rows vs 10 N rows (each in a fresh process).

Prints the figures, then, last, the three ratios: capture/forward (goal ≥ 0.9), read/train (goal ≥ 10,
the shuffled lookup's), peak RSS 10N/N (goal ≈ 1).

    python benchmarks/logit_cache_throughput.py [--rows 150] [--reps 3]
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch

import kdflow.logit_cache.topk
from kdflow.config.logit_cache import ValueEncoding
from kdflow.logit_cache.format import cache_meta, write_shard
from kdflow.logit_cache.reader import LogitCache
from kdflow.logit_cache.topk import hf_topk, length_batches, topk_of_logits
from kdflow.logit_cache.writer import capture_shards
from kdflow.training.tiny_models import llama_model
from logit_cache_bytes import RESULTS, held_out_rows, text_teacher

K, BATCH_TOKENS, SHARD_ROWS = 50, 8192, 64
STUDENT = dict(hidden=64, layers=2, heads=2, intermediate=128)  # the demo's students
WIDE = dict(hidden=512, layers=4, heads=8, intermediate=2048)  # 12.6M parameters without embeddings
TRAIN_BATCH = 64


def meta(tokenizer, vocab: int) -> dict:
    return cache_meta(
        teachers=[{"model": "text-teacher", "revision": None, "weight": 1.0}],
        tokenizer=tokenizer,
        vocab_size=vocab,
        k=K,
        temperature=1.0,
        encoding=ValueEncoding.u8,
        source="hf",
    )


@torch.inference_mode()
def plain_forward(model, rows, pad_id: int) -> None:
    """The reference: the same batches through the same model, nothing kept."""
    for batch in length_batches([len(r.input_ids) for r in rows], BATCH_TOKENS):
        width = max(len(rows[i].input_ids) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, i in enumerate(batch):
            ids[b, : len(rows[i].input_ids)] = torch.from_numpy(rows[i].input_ids)
            mask[b, : len(rows[i].input_ids)] = 1
        model(input_ids=ids, attention_mask=mask).logits.sum()


def capture(model, rows, tokenizer, folder: Path) -> dict:
    ids = [r.row_id for r in rows]
    return capture_shards(
        folder,
        ids,
        SHARD_ROWS,
        meta(tokenizer, model.config.vocab_size),
        lambda idx: hf_topk(model, [rows[i] for i in idx], K, 1.0, BATCH_TOKENS, tokenizer.pad_token_id or 0),
    )


def capture_vs_forward(model, rows, tokenizer, folder: Path, reps: int) -> tuple[float, float, dict]:
    """(forward tokens/s, capture tokens/s, the capture's manifest): alternating, medians of ``reps``."""
    tokens = sum(len(r.input_ids) for r in rows)
    plain_forward(model, rows[:8], tokenizer.pad_token_id)  # warm-up
    forward_s, capture_s = [], []
    for rep in range(reps):
        start = time.perf_counter()
        plain_forward(model, rows, tokenizer.pad_token_id)
        forward_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        m = capture(model, rows, tokenizer, folder / f"rep{rep}")
        capture_s.append(time.perf_counter() - start)
    return tokens / statistics.median(forward_s), tokens / statistics.median(capture_s), m


def capture_time_by_part(model, rows, tokenizer, folder: Path) -> dict[str, float]:
    """Seconds of one capture by part, from cProfile (which adds a little to each Python call; the ratio above
    is timed without it): the model's forward (through its head), top-k, the exp-sum of the logsumexp, the
    rest of ``topk_of_logits``, gathering the answer positions' logits, writing shards, everything else."""
    profile = cProfile.Profile()
    profile.runcall(capture, model, rows, tokenizer, folder)
    stats = pstats.Stats(profile).stats  # {(file, line, name): (calls, primitive calls, own s, cumulative s, callers)}

    def key(fn) -> tuple:
        code = inspect.unwrap(fn).__code__
        return code.co_filename, code.co_firstlineno, code.co_name

    def called_from(module, method: str) -> float:
        """Cumulative seconds of a tensor method called from ``module``'s code (its comprehensions included)."""
        return sum(
            t[3]
            for (f, _, n), v in stats.items()
            if f == "~" and n.startswith(f"<method '{method}' ")
            for (caller, _, _), t in v[4].items()
            if caller == module.__file__
        )

    total = sum(v[2] for v in stats.values())
    parts = {
        "forward": stats[key(type(model).forward)][3],
        "top-k": called_from(kdflow.logit_cache.topk, "topk"),
        "exp-sum": called_from(kdflow.logit_cache.topk, "exp_"),
        "gather answer logits": called_from(kdflow.logit_cache.topk, "index_select"),
        "write shards": stats[key(write_shard)][3],
    }
    parts["rest of topk_of_logits"] = stats[key(topk_of_logits)][3] - parts["top-k"] - parts["exp-sum"]
    parts["everything else"] = total - sum(parts.values())
    return parts


def train_tokens_per_s(tokenizer, rows, steps: int = 8) -> float:
    """Answer tokens per second the demo-sized student consumes in optimizer steps (batch 64)."""
    student = llama_model(tokenizer, seed=0, **STUDENT)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    batches = [[rows[order[(s * TRAIN_BATCH + j) % len(rows)]] for j in range(TRAIN_BATCH)] for s in range(steps + 1)]
    tokens, seconds = 0, 0.0
    for s, batch in enumerate(batches):
        width = max(len(r.input_ids) for r in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for b, r in enumerate(batch):
            ids[b, : len(r.input_ids)] = torch.from_numpy(r.input_ids)
            labels[b, r.start + 1 : len(r.input_ids)] = torch.from_numpy(r.input_ids[r.start + 1 :])
        start = time.perf_counter()
        student(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if s:  # the first step warms up
            seconds += time.perf_counter() - start
            tokens += int((labels != -100).sum())
    return tokens / seconds


def read_tokens_per_s(folder: Path, shuffled: bool) -> float:
    cache = LogitCache.open(folder)
    start = time.perf_counter()
    if shuffled:
        order = cache.row_ids
        random.Random(1).shuffle(order)
        tokens = sum(len(cache[row_id].ids) for row_id in order)
    else:
        tokens = sum(len(r.ids) for r in cache.iter_rows())
    return tokens / (time.perf_counter() - start)


RSS_CHILD = """
import sys, tempfile
from pathlib import Path
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
import torch
torch.set_num_threads(1)
from kdflow.logit_cache.topk import EncodedRow
from logit_cache_throughput import capture
from logit_cache_bytes import held_out_rows, text_teacher
model, tokenizer = text_teacher()
base = held_out_rows(tokenizer, 40)
n = int(sys.argv[1])
# Short sequences (the last 48 tokens' worth of answer), repeated under new row ids: N and 10 N rows.
rows = [EncodedRow(f"r{{i:06d}}", base[i % 40].input_ids[: base[i % 40].start + 49], base[i % 40].start)
        for i in range(n)]
with tempfile.TemporaryDirectory() as tmp:
    m = capture(model, rows, tokenizer, Path(tmp) / "c")
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report the parent's peak.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(m["positions"], hwm)
"""


def peak_rss_kb(n: int) -> tuple[int, int]:
    code = RSS_CHILD.format(root=str(ROOT), bench=str(ROOT / "benchmarks"))
    out = subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True, check=True)
    positions, rss = out.stdout.split()[-2:]
    return int(positions), int(rss)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=150)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rss-rows", type=int, default=100, help="N for the peak-RSS comparison (N vs 10 N)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = text_teacher()
    rows = held_out_rows(tokenizer, args.rows)
    tokens = sum(len(r.input_ids) for r in rows)
    # A wider teacher of the same vocabulary (random weights: speed does not depend on them) shows the trend:
    # top-k over V costs a fixed amount per token, the forward grows with the teacher.
    wide = llama_model(tokenizer, seed=0, **WIDE).eval()
    with tempfile.TemporaryDirectory() as tmp:
        forward_tps, capture_tps, m = capture_vs_forward(model, rows, tokenizer, Path(tmp) / "text", args.reps)
        wide_forward_tps, wide_capture_tps, _ = capture_vs_forward(
            wide, rows[:40], tokenizer, Path(tmp) / "wide", args.reps
        )
        by_part = capture_time_by_part(model, rows, tokenizer, Path(tmp) / "profiled")
        folder = Path(tmp) / "text" / "rep0"
        read_seq = statistics.median(read_tokens_per_s(folder, shuffled=False) for _ in range(args.reps))
        read_random = statistics.median(read_tokens_per_s(folder, shuffled=True) for _ in range(args.reps))
    train_tps = train_tokens_per_s(tokenizer, rows)
    (n1, rss1), (n10, rss10) = peak_rss_kb(args.rss_rows), peak_rss_kb(10 * args.rss_rows)

    print(
        f"teacher vocab {model.config.vocab_size:,}, k={K}, {len(rows)} rows, {tokens:,} tokens "
        f"({m['positions']:,} answer positions), torch threads {torch.get_num_threads()}"
    )
    print(f"  plain forward:         {forward_tps:12,.0f} tokens/s")
    print(f"  capture (+ shards):    {capture_tps:12,.0f} tokens/s")
    print(
        f"  wider teacher (hidden {WIDE['hidden']}, {WIDE['layers']} layers): forward {wide_forward_tps:,.0f}, "
        f"capture {wide_capture_tps:,.0f} tokens/s: ratio {wide_capture_tps / wide_forward_tps:.2f}"
    )
    print(
        "  one capture, by part (cProfile), per token: "
        + ", ".join(f"{name} {seconds / tokens * 1e6:.1f} us" for name, seconds in by_part.items())
        + f"; the plain forward takes {1e6 / forward_tps:.1f} us per token"
    )
    print(f"  read, streamed:        {read_seq:12,.0f} answer tokens/s")
    print(f"  read, shuffled row ids:{read_random:12,.0f} answer tokens/s")
    print(
        f"  student training:      {train_tps:12,.0f} answer tokens/s (hidden {STUDENT['hidden']}, batch {TRAIN_BATCH})"
    )
    print(f"  peak RSS capturing {n1:,} positions: {rss1 / 1024:.0f} MiB; {n10:,} positions: {rss10 / 1024:.0f} MiB")
    ratios = {
        "capture_vs_forward": capture_tps / forward_tps,
        "capture_vs_forward_wide": wide_capture_tps / wide_forward_tps,
        "read_shuffled_vs_train": read_random / train_tps,
        "read_streamed_vs_train": read_seq / train_tps,
        "peak_rss_10x_vs_1x": rss10 / rss1,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "logit_cache_throughput.json").write_text(
        json.dumps(
            {
                "k": K,
                "rows": len(rows),
                "tokens": tokens,
                "wide_teacher": WIDE,
                "forward_tokens_per_s": forward_tps,
                "capture_tokens_per_s": capture_tps,
                "capture_seconds_by_part": by_part,
                "read_streamed_tokens_per_s": read_seq,
                "read_shuffled_tokens_per_s": read_random,
                "train_tokens_per_s": train_tps,
                "peak_rss_kib": {str(n1): rss1, str(n10): rss10},
                **ratios,
            },
            indent=1,
        )
    )
    print(
        f"capture/forward {ratios['capture_vs_forward']:.2f} "
        f"(wider teacher {ratios['capture_vs_forward_wide']:.2f}); read (shuffled)/train "
        f"{ratios['read_shuffled_vs_train']:.1f} (streamed {ratios['read_streamed_vs_train']:.1f}); "
        f"peak RSS 10N/N {ratios['peak_rss_10x_vs_1x']:.2f}"
    )


if __name__ == "__main__":
    main()
