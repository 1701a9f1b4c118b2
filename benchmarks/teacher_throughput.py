"""Teacher-stage throughput vs a bare asyncio ``openai`` client: same vLLM server, same prompts, same
concurrency, same sampling. The stage side is the generate stage's own request path (``api_answers``: request
building, counted retries, every answer persisted to its shard as it arrives, shards read back); the bare side
is ``asyncio.gather`` over ``chat.completions.create`` under a semaphore, results kept in memory.

Alternating, several repetitions after one warm-up of each, median completed requests per second. Prints the
figures and then, last, the ratio stage / bare (judged: >= 0.9).

    python benchmarks/teacher_throughput.py [--requests 300] [--concurrency 16] [--reps 3]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import build_tiny_teacher  # also sets PREFECT_HOME & co. before prefect is imported

COT = "Solve step by step: {{ question }}"
from results import options, save


def questions(n: int) -> list[dict]:
    return [
        {"id": f"q-{i:05d}", "split": "prompts", "question": f"{i % 9 + 1}+{i % 7 + 1}-{i % 5}", "answer": "0"}
        for i in range(n)
    ]


def stage_side(section, model: str, rows: list[dict], folder: Path) -> int:
    """As the stage runs it, progress bar included (the Prefect progress artifact aside: it needs a server)."""
    from tqdm import tqdm

    from kdflow.teacher.generation import api_answers

    with tqdm(total=len(rows), desc="teacher", unit="req", mininterval=1.0) as bar:

        def progress(acct):
            if bar.update(acct.answers + acct.failures - bar.n):
                bar.set_postfix(retries=acct.retries, failed=acct.failures, refresh=False)

        answers, failures, _ = api_answers(section, model, rows, folder, progress)
    return len(answers) + len(failures)


def bare_side(base_url: str, model: str, rows: list[dict], concurrency: int, max_tokens: int) -> int:
    import openai

    async def main():
        sem = asyncio.Semaphore(concurrency)
        async with openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0) as client:

            async def one(r):
                async with sem:
                    return await client.chat.completions.create(
                        model=model,
                        messages=[{"role": "user", "content": r["teacher_prompt"]}],
                        max_tokens=max_tokens,
                        temperature=0.0,
                        top_p=1.0,
                        n=1,
                    )

            return await asyncio.gather(*(one(r) for r in rows))

    return len(asyncio.run(main()))


def main() -> None:
    args = options(__doc__, requests=300, concurrency=16, max_tokens=32, reps=3)

    from kdflow.config.generation import GenerationSection
    from kdflow.config.templates import render
    from kdflow.teacher.vllm_server import vllm_server

    work = Path(tempfile.mkdtemp(prefix="kdflow-bench-teacher-"))
    model = str(build_tiny_teacher(work / "teacher"))
    rows = [
        {
            **q,
            "sample": 0,
            "prompt": render(COT, question=q["question"]),
            "teacher_prompt": render(COT, question=q["question"]),
        }
        for q in questions(args.requests)
    ]
    rates: dict[str, list[float]] = {"stage": [], "bare": []}
    server_args = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
    with vllm_server(model, extra_args=server_args, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as url:
        section = GenerationSection(
            backend="openai",
            splits=["prompts"],
            max_new_tokens=args.max_tokens,
            api={"base_url": url, "model": model, "concurrency": args.concurrency, "api_key_env": None},
        )
        sides = {
            "stage": lambda rep: stage_side(section, model, rows, work / f"shards-{rep}"),
            "bare": lambda rep: bare_side(url, model, rows, args.concurrency, args.max_tokens),
        }
        for rep in range(-1, args.reps):  # rep -1: warm-up of both sides, not counted
            for name, run in sides.items():
                start = time.perf_counter()
                done = run(rep)
                rate = done / (time.perf_counter() - start)
                assert done == len(rows), f"{name} completed {done} of {len(rows)}"
                if rep >= 0:
                    rates[name].append(rate)
                print(f"rep {rep} {name:>5}: {rate:.1f} requests/s", flush=True)

    stage, bare = statistics.median(rates["stage"]), statistics.median(rates["bare"])
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "reps": args.reps,
        "stage_requests_per_s": round(stage, 2),
        "bare_requests_per_s": round(bare, 2),
        "ratio_stage_over_bare": round(stage / bare, 3),
        "rates": rates,
    }
    save("teacher_throughput", result)
    print(
        f"median: stage {stage:.1f} requests/s, bare asyncio openai client {bare:.1f} requests/s "
        f"({args.requests} requests, concurrency {args.concurrency}, max_tokens {args.max_tokens})"
    )
    print(f"teacher throughput ratio (stage / bare client): {stage / bare:.3f}")


if __name__ == "__main__":
    main()
