"""bfloat16 against float32 training of the real-LM study's student, on this CPU: the time one optimizer step takes.

The student is recipes/smollm2.yaml's: SmolLM2-135M-Instruct (the registry GGUF, dequantized) cut to 15 of its 30
layers (every other one here: a step's cost does not depend on which layers are kept). It trains as the study's SFT
and seq-KD arms do (kdflow's ``train_sft``: TRL's SFTTrainer through ``trainer_config``, batch 8, max length 384,
lr 1e-4) on the first ``--rows`` T0 prompts with their reference completions, through the model's chat template.

- ``float32``: the study's setting (no ``dtype``: float32 weights, no autocast);
- ``bfloat16``: a student section's ``dtype: bfloat16``: weights loaded in bf16 (``kdflow.config.precision``); on a
  CPU kdflow turns TRL's autocast flag off (``CPU_OVERRIDES``), so the whole step, AdamW's too, runs in bf16.

Each configuration trains in its own fresh process, the two alternating ``--reps`` times so that drifting load hits
both alike; step time is the median over the steps after a warm-up (a trainer callback: setup and saving left out).
Also printed: each run's mean training loss over its last steps, so that a precision that trains nothing is seen
(this benchmark does not measure what bf16 does to a finished student's quality: that takes the study). Last line:
the bf16 / fp32 step-time ratio.

    python benchmarks/student_precision.py [--rows 64] [--steps 12] [--reps 2] [--threads 2] [--teacher MODEL_FOLDER]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import save  # noqa: E402
from benchmarks.width_pruning import teacher_folder  # noqa: E402  (the GGUF imported once, or the folder given)

LAYERS, WARMUP = 15, 2
TRAINING = {"per_device_train_batch_size": 8, "learning_rate": 1.0e-4, "max_length": 384, "logging_steps": 1}
CONFIGS = ("float32", "bfloat16")


def rows(n: int) -> list[dict]:
    """The first ``n`` T0 transfer prompts with their reference completions, as the SFT arm reads them."""
    from kdflow.config.templates import chat, render

    template = (ROOT / "prompts" / "instruct.jinja").read_text()
    lines = (ROOT / "data" / "t0-short" / "prompts.jsonl").read_text().splitlines()[:n]
    return [chat(render(template, question=r["prompt"]), r["completion"]) for r in map(json.loads, lines)]


def child(teacher: Path, config: str, n_rows: int, steps: int, threads: int, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.step_timer import StepTimer
    from kdflow.config.precision import Dtype, training_flags, weights_dtype
    from kdflow.config.training import trainer_config
    from kdflow.models.pruning import keep_layers
    from kdflow.training.sft import train_sft

    torch.set_num_threads(threads)
    dtype = Dtype(config)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    full = AutoModelForCausalLM.from_pretrained(teacher, dtype=weights_dtype(dtype))
    student = keep_layers(full, list(range(0, 2 * LAYERS, 2)))
    del full
    training = {**TRAINING, **training_flags(dtype), "max_steps": steps}
    timer = StepTimer()
    history = train_sft(student, tokenizer, rows(n_rows), trainer_config(training, out, 0), out, callbacks=[timer])
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "step_s": statistics.median(timer.times[WARMUP:]),
        "loss_last": statistics.mean(losses[-4:]),
        "weights": str(next(student.parameters()).dtype),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--teacher", default="", help="an imported SmolLM2 folder (default: import the GGUF here)")
    p.add_argument("--child", nargs=3, metavar=("TEACHER", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        teacher, config, out = args.child
        print(json.dumps(child(Path(teacher), config, args.rows, args.steps, args.threads, Path(out))))
        return

    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        teacher = teacher_folder(args.teacher, Path(tmp))
        for rep in range(args.reps):
            for config in CONFIGS:  # alternating
                done = subprocess.run(
                    [sys.executable, __file__, "--child", str(teacher), config, str(Path(tmp) / f"out-{config}-{rep}")]
                    + ["--rows", str(args.rows), "--steps", str(args.steps), "--threads", str(args.threads)],
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    raise SystemExit(f"{config} failed:\n{done.stderr[-3000:]}")
                runs[config].append(json.loads(done.stdout.strip().splitlines()[-1]))
                r = runs[config][-1]
                print(f"rep {rep} {config:>8}: {r['step_s']:.2f} s/step, loss {r['loss_last']:.3f}", flush=True)

    med = {c: statistics.median(r["step_s"] for r in runs[c]) for c in CONFIGS}
    ratio = med["bfloat16"] / med["float32"]
    save("student_precision", {"args": vars(args), "runs": runs, "median_step_s": med, "bf16_over_fp32": ratio})
    for c in CONFIGS:
        print(f"{c:>8}: {med[c]:.2f} s/step (median of {args.reps}), loss {runs[c][-1]['loss_last']:.3f}")
    shape = f"batch 8, max length 384, 15-layer SmolLM2 student, {args.threads} threads"
    print(f"bf16 / fp32 step time: {ratio:.3f} ({shape})")


if __name__ == "__main__":
    main()
