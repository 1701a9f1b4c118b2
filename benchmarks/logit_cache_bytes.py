"""Logit-cache size and fidelity: bytes per answer token at k = 20, 50, 64 for each value encoding, each with
its reconstruction error, the mean KL(full teacher distribution ‖ distribution rebuilt from the cache), on
held-out text.

The teacher: a small Llama language model trained here for a minute on Python's standard-library sources
(a 4,096-token BPE, so k = 64 keeps 1.6 % of the vocabulary and the tail matters; the demo's arithmetic
teacher has 64 tokens, where k = 64 is the whole distribution). Held-out text: stdlib files it did not
train on. The same top-k are also written with their ids mapped one-to-one into a 151,936-token space (a
Qwen2.5 vocabulary: 3-byte ids) to measure what a real-scale vocabulary costs in this format; the KL does
not depend on the id labels.

Bytes per answer token = the shards' bytes (everything: ids, log-probs, tail, the sequences' own token ids,
row ids, parquet overhead) / the positions stored. Anchor: DistillKit stores ~114 bytes/token at k = 50.
Prints the table, then, last, the ratio bytes/token at k = 50 (u8, 3-byte ids) / 114.

    python benchmarks/logit_cache_bytes.py [--rows 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kdflow.capture import EncodedRow, encode_row, hf_topk  # noqa: E402
from kdflow.logit_cache import (LogitCache, TopK, ValueEncoding, cache_meta, capture_shards,  # noqa: E402
                                kl_full_vs_cache, rebuild_logprobs)
from kdflow.prompts import chat  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TEACHER_DIR = RESULTS / "text-teacher"
TEACHER = dict(vocab=4096, hidden=128, layers=2, heads=4, intermediate=512, steps=300, batch=16, seq=128, lr=3e-3)
QWEN_VOCAB = 151_936
KS = (20, 50, 64)
DISTILLKIT_K50 = 114.0


def stdlib_texts() -> tuple[list[str], list[str]]:
    """(train, held-out) chunks of ~800 characters from the stdlib's top-level modules; every 10th file is
    held out."""
    files = sorted(Path(json.__file__).parent.parent.glob("*.py"))  # the stdlib folder of this Python
    train, held = [], []
    for i, f in enumerate(files):
        text = f.read_text(errors="replace")
        chunks = [text[j : j + 800] for j in range(0, len(text) - 200, 800)]
        (held if i % 10 == 0 else train).extend(chunks)
    return train, held


def text_teacher():
    """The benchmark's teacher, trained once and kept under benchmarks/results/ (reused when its settings match)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdflow.tiny_models import llama_model, train_tokenizer

    stamp = TEACHER_DIR / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == TEACHER:
        return AutoModelForCausalLM.from_pretrained(TEACHER_DIR).eval(), AutoTokenizer.from_pretrained(TEACHER_DIR)
    t = TEACHER
    train, _ = stdlib_texts()
    tokenizer = train_tokenizer(train, t["vocab"])
    model = llama_model(tokenizer, t["hidden"], t["layers"], t["heads"], t["intermediate"], seed=0)
    stream = torch.tensor([i for c in train for i in tokenizer(c)["input_ids"]])
    windows = stream[: len(stream) // t["seq"] * t["seq"]].view(-1, t["seq"])
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"])
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(t["steps"]):
        batch = windows[torch.randint(len(windows), (t["batch"],), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 100 == 0 or step == t["steps"] - 1:
            print(f"  teacher step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.save_pretrained(TEACHER_DIR)
    tokenizer.save_pretrained(TEACHER_DIR)
    stamp.write_text(json.dumps(TEACHER))
    return model.eval(), tokenizer


def held_out_rows(tokenizer, n: int) -> list[EncodedRow]:
    _, held = stdlib_texts()
    rows = []
    for i, text in enumerate(held[:n]):
        m = chat("Continue this Python file.", text)
        rows.append(encode_row(tokenizer, f"held-{i:05d}", m["prompt"], m["completion"]))
    return rows


def relabel(row: TopK, mapping: np.ndarray) -> TopK:
    return TopK(row.row_id, mapping[row.input_ids], row.start, mapping[row.ids], row.logprobs, row.tail)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200, help="held-out sequences")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = text_teacher()
    V = model.config.vocab_size
    rows = held_out_rows(tokenizer, args.rows)
    mapping = np.random.default_rng(0).permutation(QWEN_VOCAB)[:V]  # one-to-one into a Qwen-sized vocabulary
    results, folders = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in KS:
            topk = {r.row_id: r for r in hf_topk(model, rows, k)}
            for encoding in ValueEncoding:
                for vocab, label in ((V, f"{V:,}"), (QWEN_VOCAB, f"{QWEN_VOCAB:,}")):
                    fn = (lambda r: r) if vocab == V else (lambda r: relabel(r, mapping))
                    meta = cache_meta(teachers=[{"model": "text-teacher", "revision": None, "weight": 1.0}],
                                      tokenizer=tokenizer, vocab_size=vocab, k=k, temperature=1.0,
                                      encoding=encoding, source="hf")
                    folder = Path(tmp) / f"k{k}-{encoding.value}-{vocab}"
                    ids = [r.row_id for r in rows]
                    m = capture_shards(folder, ids, 1024, meta, lambda idx: [fn(topk[ids[i]]) for i in idx])
                    results.append({"k": k, "encoding": encoding.value, "vocab": vocab, "id_bytes": m["id_bytes"],
                                    "bytes_per_token": m["bytes"] / m["positions"], "positions": m["positions"]})
                    if vocab == V:
                        folders[(k, encoding.value)] = folder
                    print(f"  k={k:>2} {encoding.value:>4} vocab {label:>7}: {m['bytes'] / m['positions']:6.1f} bytes/token")
        kl = {key: [] for key in folders}
        caches = {key: LogitCache.open(f) for key, f in folders.items()}
        with torch.inference_mode():
            for r in rows:
                logits = model(input_ids=torch.from_numpy(r.input_ids)[None]).logits[0, r.start : len(r.input_ids) - 1]
                full = torch.log_softmax(logits.float(), dim=-1)
                for key, cache in caches.items():
                    c = cache[r.row_id]
                    kl[key].append(kl_full_vs_cache(full, rebuild_logprobs(c.ids, c.logprobs, c.tail, V)))
    for res in results:
        res["kl_mean"] = float(torch.cat(kl[(res["k"], res["encoding"])]).mean())
    print(f"\nteacher: Llama {TEACHER['hidden']}x{TEACHER['layers']}, vocab {V:,}; held-out: {len(rows)} sequences, "
          f"{results[0]['positions']:,} answer tokens")
    print(f"{'k':>3} {'values':>6} {'vocab':>8} {'id bytes':>8} {'bytes/token':>11} {'KL(full||cache) nats':>21}")
    for res in results:
        print(f"{res['k']:>3} {res['encoding']:>6} {res['vocab']:>8,} {res['id_bytes']:>8} "
              f"{res['bytes_per_token']:>11.1f} {res['kl_mean']:>21.5f}")
    headline = next(r for r in results if r["k"] == 50 and r["encoding"] == "u8" and r["vocab"] == QWEN_VOCAB)
    ratio = headline["bytes_per_token"] / DISTILLKIT_K50
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "logit_cache_bytes.json").write_text(json.dumps(
        {"teacher": {**TEACHER, "vocab_size": V}, "rows": len(rows), "results": results,
         "anchor_distillkit_k50_bytes": DISTILLKIT_K50, "ratio_k50_u8_qwen_vocab_vs_distillkit": ratio}, indent=1))
    print(f"bytes/token at k=50 (u8, {QWEN_VOCAB:,}-token ids) / DistillKit's 114: {ratio:.3f}")


if __name__ == "__main__":
    main()
