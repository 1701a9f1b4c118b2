"""Requests paid twice after a SIGKILL: the generate stage's request path runs in a child process against a
real vLLM server behind a counting proxy, is SIGKILLed mid-run several times (each rerun resumes from the
shards), then finishes. A request is repeated when the proxy received the same body before the run that sends
it again (each distinct request counted once; a retry within a run is the client's accounting, not this);
after each kill only the requests that were in flight may be repeated: each kill's repeats <= the concurrency.

Prints the repeats per kill, checks exactly one answer per (prompt, sample), and last the ratio
max repeats per kill / concurrency limit (judged: <= 1).

    python benchmarks/sigkill_repeats.py [--kills 5] [--requests 400] [--concurrency 8]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import build_tiny_teacher
from fault_proxy import FaultProxy
from results import options, save

CHILD = """
import json, sys
from pathlib import Path
from kdflow.config.generation import GenerationSection
from kdflow.teacher.generation import api_answers
spec = json.loads(Path(sys.argv[1]).read_text())
api_answers(GenerationSection(**spec["section"]), spec["model"], spec["rows"], Path(spec["folder"]))
"""


def repeated(before: Counter, now: Counter) -> int:
    """Distinct requests received since ``before`` that had been received before it."""
    return sum(1 for body in Counter(now) - before if before[body])


def answered(folder: Path) -> int:
    from kdflow.teacher.answer_shards import read_shards

    return len(read_shards(folder)[0]) if folder.is_dir() else 0


def main() -> None:
    args = options(__doc__, kills=5, requests=400, concurrency=8)

    from kdflow.config.generation import GenerationSection
    from kdflow.teacher.answer_shards import read_shards
    from kdflow.teacher.generation import api_answers
    from kdflow.teacher.vllm_server import vllm_server

    work = Path(tempfile.mkdtemp(prefix="kdflow-bench-sigkill-"))
    model = str(build_tiny_teacher(work / "teacher"))
    rows = [
        {
            "id": f"q-{i:05d}",
            "split": "prompts",
            "question": f"{i % 9 + 1}+{i % 7 + 1}-{i % 5}+{i % 11}",
            "answer": "0",
            "sample": 0,
        }
        for i in range(args.requests)
    ]
    rows = [{**r, "prompt": r["question"], "teacher_prompt": r["question"]} for r in rows]
    folder = work / "shards"
    server_args = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
    with (
        vllm_server(model, extra_args=server_args, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as url,
        FaultProxy(url.removesuffix("/v1")) as proxy,
    ):
        section = {
            "backend": "openai",
            "splits": ["prompts"],
            "max_new_tokens": 32,
            "api": {
                "base_url": proxy.url + "/v1",
                "model": model,
                "concurrency": args.concurrency,
                "api_key_env": None,
            },
        }
        spec = work / "spec.json"
        spec.write_text(json.dumps({"section": section, "model": model, "rows": rows, "folder": str(folder)}))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        repeats, killed_at = [], []
        for k in range(args.kills):
            at = (k + 1) * args.requests // (args.kills + 1)  # kill points spread over the run
            before = Counter(proxy.bodies)
            child = subprocess.Popen([sys.executable, "-c", CHILD, str(spec)], cwd=ROOT, env=env)
            while answered(folder) < at and child.poll() is None:
                time.sleep(0.02)
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            killed_at.append(answered(folder))
            repeats.append(repeated(before, proxy.bodies))
            print(
                f"kill {k + 1}: {killed_at[-1]} answers persisted; this run repeated {repeats[-1]} requests", flush=True
            )
        before = Counter(proxy.bodies)
        answers, failures, acct = api_answers(GenerationSection(**section), model, rows, folder)
        final_repeats = repeated(before, proxy.bodies)

    keys = [(a["id"], a["sample"]) for a in read_shards(folder)[0].values()]
    assert len(answers) == len(rows) == len(set(keys)) and not failures, "not exactly one answer per (prompt, sample)"
    per_kill = repeats[1:] + [final_repeats]  # the run after kill i repeats what kill i cut off
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "kills": args.kills,
        "killed_at": killed_at,
        "repeats_per_kill": per_kill,
        "total_requests_sent": sum(proxy.bodies.values()),
        "final_run_retries": acct.retries,
        "max_repeats_over_concurrency": round(max(per_kill) / args.concurrency, 3),
    }
    save("sigkill_repeats", result)
    print(
        f"{args.kills} SIGKILLs over {args.requests} requests at concurrency {args.concurrency}: repeats per kill "
        f"{per_kill}, {sum(proxy.bodies.values())} requests sent in all; exactly one answer per (prompt, sample)"
    )
    print(f"max repeated requests per kill / concurrency limit: {max(per_kill) / args.concurrency:.3f}")


if __name__ == "__main__":
    main()
