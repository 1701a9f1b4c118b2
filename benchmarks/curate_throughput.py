"""Curation throughput on 100k synthetic teacher answers, and the dedup step's peak memory.

Figures (medians of repeated runs, one thread):
  - the per-row filters (truncated, empty, length, refusal/format patterns, the demo's exact answer check);
  - the dedup step (exact + MinHash near-duplicates over question + answer) and its peak Python memory
    (tracemalloc, which numpy's allocations report to);
  - math-verify answer checking (GSM8K-style texts), on fewer rows since it is ~1000x slower per row;
  - the demo's curate stage body (default filters + report + PNG) on 9,000 rows.
Results go to benchmarks/results/curate_throughput.json; the line printed last is the throughput figure.

    .venv/bin/python benchmarks/curate_throughput.py
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from data import arithmetic, gsm8k
from kdflow.config.filters import FiltersSection
from kdflow.curation import drop_report
from kdflow.curation.pipeline import curate

ROWS, VERIFY_ROWS, DEMO_ROWS, REPEATS = 100_000, 5_000, 9_000, 3
WORDS = [f"w{i}" for i in range(2_000)] + ["add", "then", "so", "total", "each", "per", "and"]
from results import save


def synthetic(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic answers of ~40 words; 3% exact copies, 3% near copies (one word changed), 2% truncated,
    1% empty, 1% refusals, 10% wrong."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.06 and rows:
            src = rows[rng.randrange(len(rows))]
            words = src["text"].split()
            text = src["text"] if kind < 0.03 or len(words) < 5 else src["text"].replace(words[3], "changed", 1)
            rows.append({**src, "id": f"r{i}", "text": text})
            continue
        gold = rng.randint(0, 99)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
        answer = gold if kind > 0.10 else gold + 1
        text = f"{words}\nAnswer: {answer}"
        if 0.90 < kind < 0.91:
            text = ""
        elif 0.91 < kind < 0.92:
            text = "I'm sorry, I can't help with that."
        rows.append(
            {
                "id": f"r{i}",
                "question": f"q{rng.randrange(n)}",
                "answer": str(gold),
                "text": text,
                "finish_reason": "length" if 0.92 < kind < 0.94 else "stop",
                "completion_tokens": len(text.split()),
            }
        )
    return rows


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    import torch

    torch.set_num_threads(1)
    rows = synthetic(ROWS)
    tokens = [r["completion_tokens"] for r in rows]
    per_row = FiltersSection.model_validate({"length": {"min_tokens": 5, "max_tokens": 55}, "patterns": {}})
    dedup = FiltersSection.model_validate({"correctness": False, "truncated": False, "empty": False, "dedup": {}})
    check, extract = arithmetic.check_answer, arithmetic.extract_answer

    filter_s, (kept, dropped) = timed(lambda: curate(rows, per_row, check, extract, tokens), REPEATS)
    dedup_s, (dkept, ddropped) = timed(lambda: curate(rows, dedup, check, extract), 1)
    tracemalloc.start()
    curate(rows, dedup, check, extract)
    _, dedup_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tracemalloc.start()
    curate(
        rows, FiltersSection.model_validate({"correctness": False, "truncated": False, "empty": False}), check, extract
    )
    _, baseline_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    texts = [f"{r['text'].rsplit(chr(10), 1)[0]} so #### {r['answer']}" for r in rows[:VERIFY_ROWS]]
    verify_s, verified = timed(lambda: sum(gsm8k.check_answer(t, r["answer"]) for t, r in zip(texts, rows)), 1)

    demo = synthetic(DEMO_ROWS, seed=1)

    def demo_stage():
        k, d = curate(demo, FiltersSection(), check, extract)
        with tempfile.TemporaryDirectory() as tmp:
            drop_report.write(Path(tmp), k, d)
        return len(k)

    demo_s, _ = timed(demo_stage, REPEATS)
    result = {
        "rows": ROWS,
        "per_row_filters_rows_per_s": round(ROWS / filter_s),
        "per_row_filters_kept": len(kept),
        "per_row_filters_dropped": len(dropped),
        "dedup_rows_per_s": round(ROWS / dedup_s),
        "dedup_dropped": len(ddropped),
        "dedup_peak_mib": round(dedup_peak / 2**20, 1),
        "no_filter_pass_peak_mib": round(baseline_peak / 2**20, 1),
        "math_verify_rows_per_s": round(VERIFY_ROWS / verify_s),
        "math_verify_accepted": verified,
        "demo_stage_seconds_9000_rows": round(demo_s, 2),
    }
    save("curate_throughput", result)
    print(
        f"per-row filters: {result['per_row_filters_kept']} kept, {result['per_row_filters_dropped']} dropped of {ROWS}"
    )
    print(
        f"dedup (exact + MinHash near, question+answer): {result['dedup_dropped']} dropped, "
        f"{result['dedup_rows_per_s']:,} rows/s, peak {result['dedup_peak_mib']} MiB "
        f"(the same pass without dedup: {result['no_filter_pass_peak_mib']} MiB)"
    )
    print(f"math-verify checking: {result['math_verify_rows_per_s']:,} rows/s ({verified}/{VERIFY_ROWS} accepted)")
    print(f"demo curate stage body on {DEMO_ROWS} rows (default filters, report, PNG): {demo_s:.2f} s")
    print(f"filter throughput: {result['per_row_filters_rows_per_s']:,} rows/s on {ROWS:,} synthetic rows")


if __name__ == "__main__":
    main()
