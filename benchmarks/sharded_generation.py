"""Teacher generation sharded over 2 Dask workers vs 1 (flows/generate_sharded.py, prefect-dask), against the
same teacher server: by default a fake OpenAI-compatible server (tests/fault_proxy.py) answering each request
after --delay-ms, which stands for a served model whose latency, not this machine, is the limit; --base-url
points it at a real one (e.g. a vLLM server: `python -m vllm.entrypoints.openai.api_server --model DIR`, with
--model naming the served model). Each worker keeps `api.concurrency` requests in flight, so 2 workers put
twice as many on the server. Wall time of the whole flow, local cluster start included; alternating, median.
Prints the medians, then, last, the speed-up (1 worker / 2 workers).

    python benchmarks/sharded_generation.py [--reps 3] [--prompts 400] [--delay-ms 50] [--base-url URL --model M]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
sys.path.insert(0, str(ROOT / "benchmarks"))
import prefect_env  # noqa: F401  (before anything imports prefect)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from results import save


def recipe_in(root: Path, teacher_dir: Path, base_url: str, model: str, prompts: int, concurrency: int) -> str:
    text = f"""run: {{name: sharded, root: {root}}}
data:
  source: arithmetic
  difficulty: {{min_steps: 1, max_steps: 2, max_operand: 9}}
  splits: {{train: 10, prompts: {prompts}, test: 10}}
teacher: {{model: {teacher_dir}}}
generation:
  backend: openai
  splits: [prompts]
  max_new_tokens: 24
  api: {{base_url: '{base_url}', model: {model}, api_key_env: null, concurrency: {concurrency}}}
students:
  - {{name: s, data: gold, architecture: {{hidden: 32, layers: 1, heads: 1, intermediate: 64}}, training: {{max_steps: 1}}}}
evaluation: {{split: test}}
"""  # noqa: E501  (a recipe's student, one line as recipes write them)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sharded.yaml").write_text(text)
    return str(root / "sharded.yaml")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per worker")
    parser.add_argument("--base-url", help="a running OpenAI-compatible teacher server (default: a fake one)")
    parser.add_argument("--model", default="m")
    args = parser.parse_args()

    from prefect import flow
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect_dask import DaskTaskRunner

    from conftest import build_tiny_teacher
    from fault_proxy import FakeTeacher
    from flows.generate_sharded import generate_sharded
    from flows.train_teacher import train_teacher
    from kdflow.config.recipe import load_recipe
    from tasks.data import make_data

    work = Path(tempfile.mkdtemp(prefix="kdflow-bench-sharded-"))
    teacher_dir = build_tiny_teacher(work / "teacher")
    flow(name="warm-up")(lambda: None)()  # the temporary local server starts once, outside every timing
    fake = None if args.base_url else FakeTeacher(delay_s=args.delay_ms / 1000).__enter__()
    base_url = args.base_url or fake.url + "/v1"
    times: dict[str, list[float]] = {"1": [], "2": []}
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        for rep in range(args.reps):
            for workers in (1, 2):
                recipe = recipe_in(
                    work / f"w{workers}-{rep}", teacher_dir, base_url, args.model, args.prompts, args.concurrency
                )
                r = load_recipe(recipe)
                make_data.fn(r.run_dir, r.data)  # the data and the teacher's record, outside the timing
                train_teacher(recipe)
                runner = DaskTaskRunner(
                    cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True}
                )
                start = time.perf_counter()
                ref = generate_sharded.with_options(task_runner=runner)(recipe, None, workers)
                times[str(workers)].append(time.perf_counter() - start)
                assert ref.rows == args.prompts, ref
                print(f"rep {rep}, {workers} worker(s): {times[str(workers)][-1]:.2f} s", flush=True)
    if fake:
        fake.__exit__(None, None, None)

    one, two = statistics.median(times["1"]), statistics.median(times["2"])
    result = {
        "reps": args.reps,
        "prompts": args.prompts,
        "teacher": args.base_url or f"fake, {args.delay_ms} ms/request",
        "concurrency_per_worker": args.concurrency,
        "median_1_worker_s": round(one, 2),
        "median_2_workers_s": round(two, 2),
        "speedup_2_over_1": round(one / two, 3),
        "times": times,
    }
    save("sharded_generation", result)
    print(f"median wall time, {args.prompts} requests: 1 worker {one:.2f} s, 2 workers {two:.2f} s")
    print(f"speed-up, 2 Dask workers over 1: {one / two:.2f}")


if __name__ == "__main__":
    main()
