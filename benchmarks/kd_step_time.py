"""KD training cost beside plain SFT: the demo's student, the same rows, the same batch.

Each configuration trains in its own fresh process (so peak RSS is its own), alternating, several times:

- ``sft``: TRL's SFTTrainer on the rows (what seq-KD costs);
- ``offline``: kdflow's CachedKDTrainer on the same rows from a top-k logit cache (forward KL, α 0.5),
  the teacher's distributions read by row id from disk every step;
- ``online``: TRL's GKD with the live teacher in memory (lmbda 0: the dataset's completions, so no
  generation — the cheapest online setting; on-policy batches add generation on top);
- ``feature``: hidden-state KD with the live teacher (MSE through a learned projection).

Step time is the median wall time per optimizer step after a warm-up, from a trainer callback (setup and
saving are left out). Peak RSS is the process's resident set (``VmRSS``) sampled at every step, its maximum
over training; its growth over the RSS right before training (torch, transformers, TRL and the data
loaded) is printed beside it, since the shared runtime dominates the total for a model this small.
(``ru_maxrss`` would not do: importing the libraries peaks higher than training a model this small.)
Children run with ``--threads`` torch threads (default 1), so that other load on the machine does not
oversubscribe their OpenMP pools; the ratios are what count.

Prints the figures, then, last, the ratios: offline/SFT step time (goal ≤ 1.15), online/SFT and
feature/SFT beside it, offline/SFT peak RSS (goal ≤ 1.2).

Rows default to the demo's transfer set (~8,200 kept answers): a shuffled batch then reads its teacher
distributions from ~60 different row groups of the cache, as the demo's students do.

    python benchmarks/kd_step_time.py [--rows 8192] [--steps 60] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

TEACHER = dict(hidden=128, layers=4, heads=4, intermediate=512)  # the demo's teacher and student
STUDENT = dict(hidden=64, layers=2, heads=2, intermediate=128)
TRAINING = {"per_device_train_batch_size": 64, "learning_rate": 3e-3, "logging_steps": 10, "max_length": 128}
K, WARMUP = 20, 10
CONFIGS = ("sft", "offline", "online", "feature")


def rows(n: int) -> list[dict]:
    from data.arithmetic import make_problem
    from kdflow.config.data import Difficulty
    from kdflow.config.templates import chat, render

    rng, template = random.Random(0), (ROOT / "prompts" / "cot.jinja").read_text()
    problems = [make_problem(rng, Difficulty(min_steps=2, max_steps=5, max_operand=9)) for _ in range(n)]
    return [
        {"row_id": f"q{i}/0", **chat(render(template, question=p["question"]), p["rationale"])}
        for i, p in enumerate(problems)
    ]


def prepare(folder: Path, n: int) -> None:
    """A demo-sized teacher (weights as initialised: the cost of a step does not depend on them) and its
    top-20 cache over ``n`` rows."""
    import torch

    from kdflow.config.logit_cache import ValueEncoding
    from kdflow.logit_cache.format import cache_meta
    from kdflow.logit_cache.topk import encode_row, hf_topk
    from kdflow.logit_cache.writer import capture_shards
    from kdflow.training.tiny_models import llama_model, train_tokenizer

    data = rows(n)
    tokenizer = train_tokenizer([r["prompt"][0]["content"] + r["completion"][0]["content"] for r in data], 64)
    teacher = llama_model(tokenizer, **TEACHER, seed=0)
    teacher.save_pretrained(folder / "teacher")
    tokenizer.save_pretrained(folder / "teacher")
    (folder / "rows.json").write_text(json.dumps(data))
    encoded = [encode_row(tokenizer, r["row_id"], r["prompt"], r["completion"]) for r in data]
    meta = cache_meta(
        teachers=[{"model": "teacher", "revision": None, "weight": 1.0}],
        tokenizer=tokenizer,
        vocab_size=teacher.config.vocab_size,
        k=K,
        temperature=1.0,
        encoding=ValueEncoding.u8,
        source="hf",
    )
    with torch.inference_mode():
        capture_shards(
            folder / "cache",
            [r.row_id for r in encoded],
            1024,
            meta,
            lambda idx: hf_topk(teacher, [encoded[i] for i in idx], K, 1.0, 16384, tokenizer.pad_token_id),
        )


def rss_mb() -> float:
    """This process's resident set now (Linux), MB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(folder: Path, config: str, steps: int, threads: int) -> dict:
    """One training run in this (fresh) process: median step time and peak RSS while training."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from kdflow.training.tiny_models import llama_model

    torch.set_num_threads(threads)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start, self.rss = [], None, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)
            self.rss.append(rss_mb())

    tokenizer = AutoTokenizer.from_pretrained(folder / "teacher")
    student = llama_model(tokenizer, **STUDENT, seed=0)
    data = [{k: v for k, v in r.items() if k != "row_id"} for r in json.loads((folder / "rows.json").read_text())]
    training, out, timer = {**TRAINING, "max_steps": steps}, folder / f"out-{config}", StepTimer()
    teacher = None if config in ("sft", "offline") else AutoModelForCausalLM.from_pretrained(folder / "teacher").eval()
    rss_before = rss_mb()
    if config == "sft":
        from kdflow.config.training import trainer_config
        from kdflow.training.sft import train_sft

        train_sft(student, tokenizer, data, trainer_config(training, out, 0), out, callbacks=[timer])
    elif config == "offline":
        from kdflow.config.training import trainer_config
        from kdflow.training.offline_kd import OfflineKDConfig, train_offline_kd

        train_offline_kd(
            student,
            tokenizer,
            None,
            trainer_config(training, out, 0, None, OfflineKDConfig, logit_cache=str(folder / "cache")),
            out,
            callbacks=[timer],
        )
    elif config == "online":
        from kdflow.training.online_kd import train_online

        train_online(
            student,
            teacher,
            tokenizer,
            data,
            training,
            out,
            0,
            lmbda=0.0,
            beta=0.5,
            temperature=1.0,
            max_new_tokens=64,
            callbacks=[timer],
        )
    else:
        from kdflow.training.feature_kd import train_feature_kd

        train_feature_kd(
            student,
            teacher,
            tokenizer,
            data,
            training,
            out,
            0,
            layer_map=None,
            kind="mse",
            weight=1.0,
            callbacks=[timer],
        )
    return {
        "step_s": statistics.median(timer.times[WARMUP:]),
        "peak_rss_mb": max(timer.rss),
        "rss_before_mb": rss_before,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", nargs=2, metavar=("FOLDER", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.steps, args.threads)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder, args.rows)
        runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        for rep in range(args.reps):
            for config in CONFIGS:  # alternating, so drifting machine load hits every configuration alike
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        str(folder),
                        config,
                        "--steps",
                        str(args.steps),
                        "--threads",
                        str(args.threads),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs[config].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(
                    f"rep {rep} {config:>8}: {runs[config][-1]['step_s'] * 1000:.1f} ms/step, "
                    f"peak RSS {runs[config][-1]['peak_rss_mb']:.0f} MB",
                    flush=True,
                )

    med = {
        c: {k: statistics.median(r[k] for r in runs[c]) for k in ("step_s", "peak_rss_mb", "rss_before_mb")}
        for c in CONFIGS
    }
    ratio = {f"{c}/sft step time": med[c]["step_s"] / med["sft"]["step_s"] for c in CONFIGS[1:]}
    growth = {c: med[c]["peak_rss_mb"] - med[c]["rss_before_mb"] for c in CONFIGS}
    ratio["offline/sft peak RSS"] = med["offline"]["peak_rss_mb"] / med["sft"]["peak_rss_mb"]
    ratio["offline/sft RSS growth during training"] = growth["offline"] / max(growth["sft"], 1e-9)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kd_step_time.json").write_text(
        json.dumps({"args": vars(args), "runs": runs, "medians": med, "ratios": ratio}, indent=1)
    )
    for c in CONFIGS:
        print(
            f"{c:>8}: {med[c]['step_s'] * 1000:.1f} ms/step, peak RSS {med[c]['peak_rss_mb']:.0f} MB "
            f"(+{growth[c]:.0f} MB while training)"
        )
    print(
        f"offline/sft step time {ratio['offline/sft step time']:.3f} (goal <= 1.15); online/sft "
        f"{ratio['online/sft step time']:.3f}; feature/sft {ratio['feature/sft step time']:.3f}; "
        f"offline/sft peak RSS {ratio['offline/sft peak RSS']:.3f} (goal <= 1.2)"
    )


if __name__ == "__main__":
    main()
