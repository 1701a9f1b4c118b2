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

from kdflow.logit_cache.topk import EncodedRow, encode_row, hf_topk  # noqa: E402
from kdflow.config.logit_cache import ValueEncoding  # noqa: E402
from kdflow.logit_cache.format import TopK, cache_meta, kl_full_vs_cache, rebuild_logprobs  # noqa: E402
from kdflow.logit_cache.reader import LogitCache  # noqa: E402
from kdflow.logit_cache.writer import capture_shards  # noqa: E402
from kdflow.config.templates import chat  # noqa: E402

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

    from kdflow.training.tiny_models import llama_model, train_tokenizer

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


def measure(name: str, model, tokenizer, rows: list[EncodedRow], vocabs: list[int], mapping=None) -> list[dict]:
    """Bytes per answer token and KL for every k (≤ V) and value encoding; ``vocabs``: the id spaces to
    write (the model's own, and a Qwen-sized one through ``mapping``)."""
    V = model.config.vocab_size
    ids = [r.row_id for r in rows]
    results, caches = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in [k for k in KS if k <= V]:
            topk = {r.row_id: r for r in hf_topk(model, rows, k)}
            for encoding in ValueEncoding:
                for vocab in vocabs:
                    fn = (lambda r: r) if vocab == V else (lambda r: relabel(r, mapping))
                    meta = cache_meta(teachers=[{"model": name, "revision": None, "weight": 1.0}],
                                      tokenizer=tokenizer, vocab_size=vocab, k=k, temperature=1.0,
                                      encoding=encoding, source="hf")
                    folder = Path(tmp) / f"k{k}-{encoding.value}-{vocab}"
                    m = capture_shards(folder, ids, 1024, meta, lambda idx: [fn(topk[ids[i]]) for i in idx])
                    results.append({"teacher": name, "k": k, "encoding": encoding.value, "vocab": vocab,
                                    "id_bytes": m["id_bytes"], "bytes_per_token": m["bytes"] / m["positions"],
                                    "positions": m["positions"]})
                    if vocab == V:
                        caches[(k, encoding.value)] = LogitCache.open(folder)
        kl = {key: [] for key in caches}
        truncation = {k: [] for k, _ in caches}  # KL of exact top-k + exact tail, same policy: no encoding at all
        tail_mass = {k: [] for k, _ in caches}
        with torch.inference_mode():
            for r in rows:
                logits = model(input_ids=torch.from_numpy(r.input_ids)[None]).logits[0, r.start : len(r.input_ids) - 1]
                full = torch.log_softmax(logits.float(), dim=-1)
                for (k, encoding), cache in caches.items():
                    c = cache[r.row_id]
                    kl[(k, encoding)].append(kl_full_vs_cache(full, rebuild_logprobs(c.ids, c.logprobs, c.tail, V)))
                    if encoding == ValueEncoding.fp16.value:
                        exact = full.topk(k, dim=-1)
                        rest = torch.logsumexp(full.scatter(-1, exact.indices, float("-inf")), dim=-1)
                        truncation[k].append(kl_full_vs_cache(full, rebuild_logprobs(exact.indices, exact.values, rest, V)))
                        tail_mass[k].append(rest.exp())
    for res in results:
        res["kl_mean"] = float(torch.cat(kl[(res["k"], res["encoding"])]).mean())
        res["kl_truncation_only"] = float(torch.cat(truncation[res["k"]]).mean())
        res["kl_from_encoding"] = res["kl_mean"] - res["kl_truncation_only"]
        res["tail_mass_mean"] = float(torch.cat(tail_mass[res["k"]]).mean())
    return results


def print_table(results: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'k':>3} {'values':>6} {'vocab':>8} {'id B':>4} {'bytes/token':>11} {'KL(full||cache)':>16} "
          f"{'of which encoding':>17} {'tail mass':>9}")
    for r in results:
        print(f"{r['k']:>3} {r['encoding']:>6} {r['vocab']:>8,} {r['id_bytes']:>4} {r['bytes_per_token']:>11.1f} "
              f"{r['kl_mean']:>16.5f} {r['kl_from_encoding']:>17.2e} {r['tail_mass_mean']:>9.2e}")


def demo_teacher_rows(run: Path, n: int):
    """The demo's trained teacher and its test split's gold rationales (held out from its training), if a
    demo run is there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdflow.config.templates import render

    teachers = sorted(run.glob("teacher/*/manifest.json"))
    tests = sorted(run.glob("data/*/test.parquet"))
    if not teachers or not tests:
        return None
    import pandas as pd

    model_dir = teachers[0].parent / "model"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    template = (ROOT / "prompts" / "cot.jinja").read_text()
    rows = []
    for r in pd.read_parquet(tests[0]).head(n).to_dict("records"):
        m = chat(render(template, question=r["question"]), r["rationale"])
        rows.append(encode_row(tokenizer, str(r["id"]), m["prompt"], m["completion"]))
    return model, tokenizer, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200, help="held-out sequences")
    parser.add_argument("--demo-run", default=str(ROOT / "runs" / "demo"), help="also measure the demo's teacher")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = text_teacher()
    V = model.config.vocab_size
    rows = held_out_rows(tokenizer, args.rows)
    mapping = np.random.default_rng(0).permutation(QWEN_VOCAB)[:V]  # one-to-one into a Qwen-sized vocabulary
    results = measure("text-teacher", model, tokenizer, rows, [V, QWEN_VOCAB], mapping)
    print_table(results, f"text teacher: Llama {TEACHER['hidden']}x{TEACHER['layers']}, vocab {V:,}; held-out: "
                         f"{len(rows)} sequences, {results[0]['positions']:,} answer tokens")
    demo = demo_teacher_rows(Path(args.demo_run), args.rows)
    demo_results = []
    if demo is not None:
        demo_results = measure("demo-teacher", *demo, [demo[0].config.vocab_size])
        print_table(demo_results, f"demo teacher (arithmetic, vocab {demo[0].config.vocab_size}): test-split "
                                  f"rationales, {demo_results[0]['positions']:,} answer tokens")
    else:
        print(f"\n(no trained demo teacher under {args.demo_run}: run `make demo` to measure it too)")
    headline = next(r for r in results if r["k"] == 50 and r["encoding"] == "u8" and r["vocab"] == QWEN_VOCAB)
    ratio = headline["bytes_per_token"] / DISTILLKIT_K50
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "logit_cache_bytes.json").write_text(json.dumps(
        {"text_teacher": {**TEACHER, "vocab_size": V}, "rows": len(rows), "results": results + demo_results,
         "anchor_distillkit_k50_bytes": DISTILLKIT_K50, "ratio_k50_u8_qwen_vocab_vs_distillkit": ratio}, indent=1))
    print(f"\nbytes/token at k=50 (u8, {QWEN_VOCAB:,}-token ids; KL {headline['kl_mean']:.4f} nats, "
          f"{headline['kl_from_encoding']:.6f} of it from the encoding) / DistillKit's 114: {ratio:.3f}")


if __name__ == "__main__":
    main()
