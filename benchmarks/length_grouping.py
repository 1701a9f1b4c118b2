"""Batches of similar lengths against random batches when training the real-LM study's student on this CPU: the wall
time of whole epochs.

A batch is padded to its longest row, and on a CPU a padding position costs as much as a real one. The study's
transfer rows (a T0 prompt through SmolLM2's chat template, then an answer of up to 128 tokens) run from about 40 to
370 tokens, so eight rows drawn at random are mostly padding-bound: on the 960-prompt study's 673 kept answers a random
batch of 8 holds 1.67 times as many positions as real tokens. transformers' ``train_sampling_strategy:
group_by_length`` (a training key of any student section; TRL's trainers take it from transformers) draws megabatches
of 50 batches at random and sorts each by length, so a batch holds rows of about one length and each epoch still sees
every row once, in a random order of batches.

The student is recipes/smollm2.yaml's, SmolLM2-135M-Instruct cut to 15 of its 30 layers (every other one: the step's
cost does not depend on which), trained as the SFT and seq-KD arms are (kdflow's ``train_sft``, batch 8, max length
384, lr 1e-4) for ``--epochs`` epochs on the first ``--rows`` T0 prompts with their reference completions. Each sampler
trains in its own fresh process, the two alternating ``--reps`` times; the figure is the sum of the step times
(setup and saving left out). Also printed: the padded positions per real token, counted over the batches each run
trained on, and the mean training loss of the last epoch. Last line: the group_by_length / random time ratio.

    python benchmarks/length_grouping.py [--rows 96] [--epochs 1] [--reps 2] [--threads 2] [--teacher MODEL_FOLDER]
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
from benchmarks.student_precision import LAYERS, rows  # noqa: E402  (the same student and rows)
from benchmarks.width_pruning import teacher_folder  # noqa: E402  (the GGUF imported once, or the folder given)

TRAINING = {"per_device_train_batch_size": 8, "learning_rate": 1.0e-4, "max_length": 384, "logging_steps": 1}
SAMPLERS = ("random", "group_by_length")


class PaddingCounter:
    """A trainer callback's view of the batches: positions (rows × the batch's length) and real tokens."""

    def __init__(self):
        self.positions = self.tokens = 0

    def count(self, batch: dict) -> None:
        mask = batch["attention_mask"]
        self.positions += mask.numel()
        self.tokens += int(mask.sum())


def child(teacher: Path, sampler: str, n_rows: int, epochs: float, threads: int, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.step_timer import StepTimer
    from kdflow.config.training import trainer_config
    from kdflow.models.pruning import keep_layers
    from kdflow.training import sft

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    full = AutoModelForCausalLM.from_pretrained(teacher)
    student = keep_layers(full, list(range(0, 2 * LAYERS, 2)))
    del full
    training = {**TRAINING, "num_train_epochs": epochs, "train_sampling_strategy": sampler}
    timer, padding = StepTimer(), PaddingCounter()
    trainer_class = sft.chunked_sft_trainer()

    class Counting(trainer_class):  # count what each step trains on, as the trainer collated it
        def training_step(self, model, inputs, num_items_in_batch=None):
            padding.count(inputs)
            return super().training_step(model, inputs, num_items_in_batch)

    sft.chunked_sft_trainer = lambda: Counting
    history = sft.train_sft(student, tokenizer, rows(n_rows), trainer_config(training, out, 0), out, callbacks=[timer])
    losses = [h["loss"] for h in history if "loss" in h]
    per_epoch = max(1, round(len(losses) / epochs))
    return {
        "seconds": sum(timer.times),
        "steps": len(timer.times),
        "positions_per_token": padding.positions / padding.tokens,
        "loss_last_epoch": statistics.mean(losses[-per_epoch:]),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--teacher", default="", help="an imported SmolLM2 folder (default: import the GGUF here)")
    p.add_argument("--child", nargs=3, metavar=("TEACHER", "SAMPLER", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        teacher, sampler, out = args.child
        print(json.dumps(child(Path(teacher), sampler, args.rows, args.epochs, args.threads, Path(out))))
        return

    runs: dict[str, list[dict]] = {s: [] for s in SAMPLERS}
    with tempfile.TemporaryDirectory() as tmp:
        teacher = teacher_folder(args.teacher, Path(tmp))
        for rep in range(args.reps):
            for sampler in SAMPLERS:  # alternating, so that drifting load hits both alike
                done = subprocess.run(
                    [sys.executable, __file__, "--child", str(teacher), sampler, str(Path(tmp) / f"{sampler}-{rep}")]
                    + ["--rows", str(args.rows), "--epochs", str(args.epochs), "--threads", str(args.threads)],
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    raise SystemExit(f"{sampler} failed:\n{done.stderr[-3000:]}")
                runs[sampler].append(json.loads(done.stdout.strip().splitlines()[-1]))
                r = runs[sampler][-1]
                print(
                    f"rep {rep} {sampler:>15}: {r['seconds']:.1f} s for {r['steps']} steps, "
                    f"{r['positions_per_token']:.2f} positions per token, loss {r['loss_last_epoch']:.3f}",
                    flush=True,
                )

    med = {s: statistics.median(r["seconds"] for r in runs[s]) for s in SAMPLERS}
    ratio = med["group_by_length"] / med["random"]
    save("length_grouping", {"args": vars(args), "runs": runs, "median_seconds": med, "grouped_over_random": ratio})
    for s in SAMPLERS:
        print(f"{s:>15}: {med[s]:.1f} s (median of {args.reps}), {runs[s][-1]['positions_per_token']:.2f} per token")
    shape = f"{args.rows} rows × {args.epochs:g} epoch, batch 8, 15-layer SmolLM2 student, {args.threads} threads"
    print(f"group_by_length / random, training time: {ratio:.3f} ({shape})")


if __name__ == "__main__":
    main()
