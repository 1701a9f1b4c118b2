"""Logit-cache size and fidelity: bytes per answer token, kdflow's format beside DistillKit's, on the same
captured top-k, with each one's reconstruction error: the mean KL(full teacher distribution ‖ distribution
rebuilt from the cache), on held-out answers.

**At Qwen2.5's vocabulary (151,936 logits; the headline).** Teacher: a Qwen2-architecture model
(kdflow.training.tiny_models.qwen2_model, 151,936 embedding rows, hidden 64) with a 151,665-token byte-level BPE
learnt locally (large_vocab_tokenizer: GSM8K's text plus made-up words), trained here on GSM8K's train split
(question + answer through the chat template; 120 steps of 8 × 128 tokens, ~10-25 min on a shared 2-core CPU), so
that its next-token distributions are learnt, not the near-uniform ones of random weights. Captured: its top-50 at every
answer position of GSM8K test rows (question → gold answer), teacher-forced (hf_topk). Written: kdflow's cache
(writer.capture_shards, u8 and fp16 log-probs) and DistillKit's layout of the SAME top-k
(benchmarks/distillkit_layout.py: 18-bit packed ids, its "budget pick" values: top-1 in bf16 + 3 float32 polynomial
coefficients, uncompressed; and the parquet file its capture script would write). The same architecture with its random
initial weights is measured too: the worst case for kdflow's ids (every shard's candidates spread over the whole
vocabulary), while DistillKit's fixed-width layout costs the same on any teacher.

**At a 4,096-token vocabulary** (kept from before, labelled so): a small Llama trained for a minute on
Python's standard-library sources, held-out stdlib files; and the demo's 52-token arithmetic teacher when a
demo run is there.

Bytes per answer token = the shards' bytes (everything: ids, log-probs, tail, the sequences' own token ids,
row ids, parquet overhead) / the positions stored. Prints the tables, then, last, one JSON line: bytes per
answer token at k = 50 for kdflow (u8) and DistillKit's layout on the trained 151,936-vocabulary teacher's
cache, and their ratio.

    python benchmarks/logit_cache_bytes.py [--rows 500] [--kl-rows 100] [--text-rows 200] [--part large|small]
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

import numpy as np
import torch

from benchmarks import distillkit_layout as dk
from benchmarks.results import save
from kdflow.config.logit_cache import LogitCacheSection, ValueEncoding
from kdflow.config.templates import chat
from kdflow.logit_cache.format import TopK, cache_meta, kl_full_vs_cache, rebuild_logprobs, tail_from_topk
from kdflow.logit_cache.reader import LogitCache
from kdflow.logit_cache.topk import EncodedRow, encode_row, hf_topk
from kdflow.logit_cache.writer import capture_shards

RESULTS = ROOT / "benchmarks" / "results"
GSM8K = ROOT / "data" / "gsm8k"  # as recipes/gsm8k-qwen7b-to-0.5b.yaml finds it
K = 50
SHARD_ROWS = LogitCacheSection.model_fields["shard_rows"].default  # the recipe default: the id table is per shard
# The large-vocabulary teacher: Qwen2 at 151,936 embedding rows, narrow so that a few minutes on 2 cores train it.
QWEN_TEACHER = dict(
    hidden=64,
    layers=2,
    heads=2,
    kv_heads=1,
    intermediate=256,
    steps=120,
    batch=8,
    seq=128,
    lr=3e-3,
    synthetic_lines=25_000,
)
QWEN_DIR = RESULTS / "qwen2-gsm8k-teacher"
# Logits per capture batch: (tokens, 151,936) float32 is ~0.6 GB at 1,024 tokens.
CAPTURE_BATCH_TOKENS = 1024


# ---- the 151,936-logit teacher --------------------------------------------------------------------------------


def gsm8k(split: str) -> list[dict]:
    path = GSM8K / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"no {path}: this benchmark's large-vocabulary teacher learns GSM8K (train.jsonl, test.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def qwen_teacher(untrained: bool = False):
    """The trained Qwen2 teacher and its tokenizer, kept under benchmarks/results/ (reused when its settings
    match); ``untrained``: the same model as initialised."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdflow.training.tiny_models import large_vocab_tokenizer, qwen2_model, save_qwen2

    t = QWEN_TEACHER
    stamp = QWEN_DIR / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == t:
        tokenizer = AutoTokenizer.from_pretrained(QWEN_DIR)
        if untrained:
            return _qwen(tokenizer, qwen2_model).eval(), tokenizer
        return AutoModelForCausalLM.from_pretrained(QWEN_DIR).eval(), tokenizer
    train = gsm8k("train")
    start = time.perf_counter()
    tokenizer = large_vocab_tokenizer(
        [f"{r['question']}\n{r['answer']}" for r in train], synthetic_lines=t["synthetic_lines"]
    )
    print(f"  tokenizer: {len(tokenizer):,} tokens ({time.perf_counter() - start:.0f} s)", flush=True)
    model = _qwen(tokenizer, qwen2_model)
    if untrained:
        return model.eval(), tokenizer
    conversations = [(lambda m: m["prompt"] + m["completion"])(chat(r["question"], r["answer"])) for r in train]
    stream = torch.tensor(
        [
            i
            for c in conversations
            for i in tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]
        ]
    )
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
        if step % 25 == 0 or step == t["steps"] - 1:
            print(f"  teacher step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    save_qwen2(QWEN_DIR, model, tokenizer)
    stamp.write_text(json.dumps(t))
    return model.eval(), tokenizer


def _qwen(tokenizer, qwen2_model):
    t = QWEN_TEACHER
    return qwen2_model(
        tokenizer,
        seed=0,
        hidden=t["hidden"],
        layers=t["layers"],
        heads=t["heads"],
        kv_heads=t["kv_heads"],
        intermediate=t["intermediate"],
    )


def gsm8k_test_rows(tokenizer, n: int) -> list[EncodedRow]:
    """GSM8K test questions with their gold answers (the teacher trained on the train split only)."""
    return [
        encode_row(tokenizer, f"test-{i:05d}", **chat(r["question"], r["answer"]))
        for i, r in enumerate(gsm8k("test")[:n])
    ]


def our_cache(folder: Path, tokenizer, name: str, topk: list[TopK], vocab: int, encoding: ValueEncoding) -> dict:
    meta = cache_meta(
        teachers=[{"model": name, "revision": None, "weight": 1.0}],
        tokenizer=tokenizer,
        vocab_size=vocab,
        k=K,
        temperature=1.0,
        encoding=encoding,
        source="hf",
    )
    return capture_shards(folder, [r.row_id for r in topk], SHARD_ROWS, meta, lambda idx: [topk[i] for i in idx])


def distillkit_rows(topk: list[TopK], vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each row's top-k through DistillKit's layout and back: (ids, log-probs) as its trainer would read them."""
    return [dk.decode(*dk.encode(r.ids, r.logprobs, dk.BUDGET, vocab), dk.BUDGET, vocab) for r in topk]


def layout_bytes(topk: list[TopK], vocab: int) -> int:
    """Bytes of DistillKit's per-position payload (values + packed ids) for every stored position, counted
    from the arrays its encoding produces."""
    return sum(sum(a.nbytes for a in dk.encode(r.ids, r.logprobs, dk.BUDGET, vocab)) for r in topk)


@torch.inference_mode()
def fidelity(model, rows: list[EncodedRow], caches: dict[str, LogitCache], distillkit: dict, vocab: int) -> dict:
    """Mean KL(full ‖ rebuilt) per cache (and DistillKit's layout, its tail spread evenly as its
    SYMMETRIC_UNIFORM densify does), the KL of the exact top-k + exact tail (truncation alone), the mean tail
    mass and the teacher's mean entropy, over ``rows``."""
    kl = {name: [] for name in [*caches, "distillkit"]}
    truncation, tail, entropy = [], [], []
    for r in rows:
        logits = model(input_ids=torch.from_numpy(r.input_ids)[None]).logits[0, r.start : len(r.input_ids) - 1]
        full = torch.log_softmax(logits.float(), dim=-1)
        for name, cache in caches.items():
            c = cache[r.row_id]
            kl[name].append(kl_full_vs_cache(full, rebuild_logprobs(c.ids, c.logprobs, c.tail, vocab)))
        ids, lps = distillkit[r.row_id]
        rest = torch.from_numpy(tail_from_topk(lps.numpy()))
        kl["distillkit"].append(kl_full_vs_cache(full, rebuild_logprobs(ids, lps, rest, vocab)))
        exact = full.topk(K, dim=-1)
        rest = torch.logsumexp(full.scatter(-1, exact.indices, float("-inf")), dim=-1)
        truncation.append(kl_full_vs_cache(full, rebuild_logprobs(exact.indices, exact.values, rest, vocab)))
        tail.append(rest.exp())
        entropy.append(-(full.exp() * full).sum(-1))
    mean = lambda parts: float(torch.cat(parts).mean())
    return {
        "kl": {name: mean(v) for name, v in kl.items()},
        "kl_truncation_only": mean(truncation),
        "tail_mass_mean": mean(tail),
        "entropy_mean_nats": mean(entropy),
    }


def measure_large_vocab(name: str, model, tokenizer, rows: list[EncodedRow], kl_rows: int) -> dict:
    vocab = model.config.vocab_size
    start = time.perf_counter()
    topk = hf_topk(model, rows, K, batch_tokens=CAPTURE_BATCH_TOKENS, pad_id=tokenizer.pad_token_id or 0)
    capture_s = time.perf_counter() - start
    positions = sum(len(r.ids) for r in topk)
    out = {
        "teacher": name,
        "vocab": vocab,
        "tokenizer_tokens": len(tokenizer),
        "k": K,
        "rows": len(rows),
        "answer_tokens": positions,
        "capture_s": round(capture_s, 1),
    }
    flat = np.concatenate([r.ids.ravel() for r in topk])
    out["distinct_topk_ids"] = int(len(np.unique(flat)))
    with tempfile.TemporaryDirectory() as tmp:
        caches = {}
        for encoding in ValueEncoding:
            folder = Path(tmp) / encoding.value
            m = our_cache(folder, tokenizer, name, topk, vocab, encoding)
            out[f"kdflow_{encoding.value}_bytes_per_token"] = m["bytes"] / m["positions"]
            caches[f"kdflow_{encoding.value}"] = LogitCache.open(folder)
        out["kdflow_id_table_entries_per_shard"] = _table_sizes(folder)
        out["distillkit_bytes_per_token"] = layout_bytes(topk, vocab) / positions
        out["distillkit_formula_bytes_per_token"] = dk.bytes_per_token(dk.BUDGET, vocab)
        written = dk.write_like_distillkit(Path(tmp) / "distillkit.parquet", topk, dk.BUDGET, vocab)
        out["distillkit_as_written_bytes_per_token"] = written / positions
        sub = rows[:kl_rows]
        decoded = dict(zip([r.row_id for r in sub], distillkit_rows(topk[: len(sub)], vocab)))
        out["fidelity"] = {"rows": len(sub), **fidelity(model, sub, caches, decoded, vocab)}
    return out


def _table_sizes(folder: Path) -> list[int]:
    import pyarrow.parquet as pq

    from kdflow.logit_cache.format import ID_TABLE, LOCAL_ID_BYTES

    sizes = []
    for f in sorted(folder.glob("shard-*.parquet")):
        meta = pq.read_schema(f).metadata
        sizes.append(len(meta[ID_TABLE]) // int(json.loads((folder / "cache.json").read_text())["id_bytes"]))
        assert int(meta[LOCAL_ID_BYTES]) in (1, 2, 3, 4)
    return sizes


def print_large_vocab(res: dict) -> None:
    f = res["fidelity"]
    print(
        f"\n{res['teacher']}: {res['vocab']:,} logits ({res['tokenizer_tokens']:,} tokenizer tokens), "
        f"k = {res['k']}; {res['rows']} held-out rows, {res['answer_tokens']:,} answer tokens; "
        f"{res['distinct_topk_ids']:,} distinct ids among the top-{res['k']}; id table per shard "
        f"{res['kdflow_id_table_entries_per_shard']}; teacher entropy {f['entropy_mean_nats']:.2f} nats, "
        f"mass outside the top-{res['k']} {f['tail_mass_mean']:.3f}; KL on {f['rows']} rows, of which truncation "
        f"alone {f['kl_truncation_only']:.4f}"
    )
    print(f"{'format':<44} {'bytes/token':>11} {'KL(full||cache)':>16}")
    for label, key, kl in [
        ("kdflow, u8 log-probs", "kdflow_u8_bytes_per_token", "kdflow_u8"),
        ("kdflow, fp16 log-probs", "kdflow_fp16_bytes_per_token", "kdflow_fp16"),
        ("DistillKit budget layout (uncompressed)", "distillkit_bytes_per_token", "distillkit"),
        ("  ... as its capture writes it (parquet)", "distillkit_as_written_bytes_per_token", None),
    ]:
        print(f"{label:<44} {res[key]:>11.1f} {f['kl'][kl] if kl else float('nan'):>16.5f}")


# ---- the 4,096-token text teacher and the demo's teacher ----------------------------------------------

TEACHER_DIR = RESULTS / "text-teacher"
TEACHER = dict(vocab=4096, hidden=128, layers=2, heads=4, intermediate=512, steps=300, batch=16, seq=128, lr=3e-3)
KS = (20, 50, 64)


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


def measure(name: str, model, tokenizer, rows: list[EncodedRow]) -> list[dict]:
    """Bytes per answer token and KL for every k (≤ V) and value encoding, in the model's own vocabulary; at
    k = 50, DistillKit's layout of the same top-k beside them (``distillkit_bytes_per_token``)."""
    V = model.config.vocab_size
    ids = [r.row_id for r in rows]
    results, caches = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in [k for k in KS if k <= V]:
            topk = {r.row_id: r for r in hf_topk(model, rows, k)}
            for encoding in ValueEncoding:
                meta = cache_meta(
                    teachers=[{"model": name, "revision": None, "weight": 1.0}],
                    tokenizer=tokenizer,
                    vocab_size=V,
                    k=k,
                    temperature=1.0,
                    encoding=encoding,
                    source="hf",
                )
                folder = Path(tmp) / f"k{k}-{encoding.value}"
                m = capture_shards(folder, ids, SHARD_ROWS, meta, lambda idx: [topk[ids[i]] for i in idx])
                results.append(
                    {
                        "teacher": name,
                        "k": k,
                        "encoding": encoding.value,
                        "vocab": V,
                        "id_bytes": m["id_bytes"],
                        "bytes_per_token": m["bytes"] / m["positions"],
                        "positions": m["positions"],
                    }
                )
                if k == dk.BUDGET.k:
                    results[-1]["distillkit_bytes_per_token"] = layout_bytes(list(topk.values()), V) / m["positions"]
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
                        truncation[k].append(
                            kl_full_vs_cache(full, rebuild_logprobs(exact.indices, exact.values, rest, V))
                        )
                        tail_mass[k].append(rest.exp())
    for res in results:
        res["kl_mean"] = float(torch.cat(kl[(res["k"], res["encoding"])]).mean())
        res["kl_truncation_only"] = float(torch.cat(truncation[res["k"]]).mean())
        res["kl_from_encoding"] = res["kl_mean"] - res["kl_truncation_only"]
        res["tail_mass_mean"] = float(torch.cat(tail_mass[res["k"]]).mean())
    return results


def print_table(results: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(
        f"{'k':>3} {'values':>6} {'vocab':>8} {'id B':>4} {'bytes/token':>11} {'KL(full||cache)':>16} "
        f"{'of which encoding':>17} {'tail mass':>9} {'DistillKit B/token':>18}"
    )
    for r in results:
        theirs = f"{r['distillkit_bytes_per_token']:>18.1f}" if "distillkit_bytes_per_token" in r else ""
        print(
            f"{r['k']:>3} {r['encoding']:>6} {r['vocab']:>8,} {r['id_bytes']:>4} {r['bytes_per_token']:>11.1f} "
            f"{r['kl_mean']:>16.5f} {r['kl_from_encoding']:>17.2e} {r['tail_mass_mean']:>9.2e} {theirs}"
        )


def smollm2_teacher():
    """SmolLM2-135M-Instruct, imported from its GGUF (`make smollm2` fetches it) into a folder under results/."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdflow.models.gguf import import_gguf
    from kdflow.models.smollm2 import gguf_path

    folder = RESULTS / "smollm2-135m-instruct"
    if not (folder / "model.safetensors").is_file():
        import_gguf(gguf_path(), folder, "float32")
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def self_instruct_rows(tokenizer, n: int) -> list[EncodedRow]:
    """The first ``n`` user-oriented Self-Instruct instructions with their human references, as chat rows."""
    from data.instructions import read_test

    rows = read_test(ROOT / "data" / "self-instruct" / "user_oriented_instructions.jsonl")[:n]
    return [encode_row(tokenizer, str(r["id"]), *chat(r["question"], r["rationale"]).values()) for r in rows]


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
    parser.add_argument("--rows", type=int, default=500, help="GSM8K test rows captured from the Qwen2 teacher")
    parser.add_argument("--kl-rows", type=int, default=100, help="of which the KL is measured on (dense: slow)")
    parser.add_argument("--text-rows", type=int, default=200, help="held-out sequences for the 4,096-token teacher")
    parser.add_argument("--demo-run", default=str(ROOT / "runs" / "demo"), help="also measure the demo's teacher")
    parser.add_argument(
        "--part",
        choices=("all", "large", "small", "smollm2"),
        default="all",
        help="large: the 151,936-logit teachers only; small: the 4,096- and 52-token ones only; "
        "smollm2: the real SmolLM2-135M-Instruct (49,152 logits) alone",
    )
    parser.add_argument(
        "--smollm2-rows",
        type=int,
        default=64,
        help="Self-Instruct instructions with their references, through SmolLM2's chat template",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.part == "smollm2":  # a real pretrained LM: the like-for-like figure against DistillKit at k = 50
        model, tokenizer = smollm2_teacher()
        res = measure_large_vocab(
            "smollm2-135m-instruct",
            model,
            tokenizer,
            self_instruct_rows(tokenizer, args.smollm2_rows),
            min(args.kl_rows, args.smollm2_rows),
        )
        print_large_vocab(res)
        save(
            "logit_cache_bytes_smollm2",
            {
                **res,
                "ratio_kdflow_u8_vs_distillkit": round(
                    res["kdflow_u8_bytes_per_token"] / res["distillkit_bytes_per_token"], 3
                ),
            },
        )
        print(
            f"\nratio kdflow u8 / DistillKit budget layout, SmolLM2-135M-Instruct, V {res['vocab']:,}, k {K}: "
            f"{res['kdflow_u8_bytes_per_token'] / res['distillkit_bytes_per_token']:.3f}"
        )
        return
    saved = {"qwen_teacher": QWEN_TEACHER, "text_teacher": TEACHER}
    if args.part in ("all", "large"):
        saved["large_vocab"] = []
        for untrained in (False, True):
            model, tokenizer = qwen_teacher(untrained)
            rows = gsm8k_test_rows(tokenizer, args.rows)
            saved["large_vocab"].append(
                measure_large_vocab(
                    "qwen2-untrained" if untrained else "qwen2-gsm8k", model, tokenizer, rows, args.kl_rows
                )
            )
            print_large_vocab(saved["large_vocab"][-1])
            del model
        head, worst = saved["large_vocab"]
        saved["headline"] = {
            "vocab": head["vocab"],
            "k": K,
            "teacher": head["teacher"],
            "kdflow_u8_bytes_per_token": round(head["kdflow_u8_bytes_per_token"], 1),
            "distillkit_bytes_per_token": round(head["distillkit_bytes_per_token"], 1),
            "untrained_kdflow_u8_bytes_per_token": round(worst["kdflow_u8_bytes_per_token"], 1),
            "untrained_ratio_kdflow_u8_vs_distillkit": round(
                worst["kdflow_u8_bytes_per_token"] / worst["distillkit_bytes_per_token"], 3
            ),
            "ratio_kdflow_u8_vs_distillkit": round(
                head["kdflow_u8_bytes_per_token"] / head["distillkit_bytes_per_token"], 3
            ),
        }
        save("logit_cache_bytes", saved)  # now too: the small part can take as long again
    if args.part in ("all", "small"):
        model, tokenizer = text_teacher()
        rows = held_out_rows(tokenizer, args.text_rows)
        saved["small_vocab"] = measure("text-teacher", model, tokenizer, rows)
        print_table(
            saved["small_vocab"],
            f"text teacher: Llama {TEACHER['hidden']}x{TEACHER['layers']}, vocab "
            f"{model.config.vocab_size:,}; held-out: {len(rows)} sequences, "
            f"{saved['small_vocab'][0]['positions']:,} answer tokens",
        )
        demo = demo_teacher_rows(Path(args.demo_run), args.text_rows)
        if demo is not None:
            demo_small = measure("demo-teacher", *demo)
            print_table(
                demo_small,
                f"demo teacher (arithmetic, vocab {demo[0].config.vocab_size}): test-split "
                f"rationales, {demo_small[0]['positions']:,} answer tokens",
            )
            saved["small_vocab"] += demo_small
        else:
            print(f"\n(no trained demo teacher under {args.demo_run}: run `make demo` to measure it too)")
    save("logit_cache_bytes" if args.part != "small" else "logit_cache_bytes_small_vocab", saved)
    if "headline" in saved:
        print(json.dumps(saved["headline"]))


if __name__ == "__main__":
    main()
