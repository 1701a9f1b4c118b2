"""KD cost at a large vocabulary: an offline-KD step beside an SFT step, V = 151,936 (Qwen2.5's), B × L = 4 × 1,024.

A Qwen2-architecture student (kdflow.training.tiny_models.qwen2_model: random weights, bf16, hidden 256, 2 layers,
4 heads / 2 KV heads, tied 151,936-row embedding: the LM head is what matters at this vocabulary), the same batch of 4
rows × 1,024 tokens (64 prompt tokens, 960 answer tokens each), three sides, each in a fresh process, alternating,
several repetitions:

- ``kd``: kdflow's CachedKDTrainer (α 0.5, forward KL, k = 50 synthetic teacher top-k per answer position) on the
  chunked head (kdflow.training.chunked_loss): the decoder's hidden states, the head on the answer positions only;
- ``sft``: TRL's SFTTrainer with its default loss (completion only; in TRL 1.16 its own chunked LM head,
  trl.kernels.chunked_logprob, tiles of 4,096 tokens × 32,768 ids);
- ``dense``: CachedKDTrainer on its dense path (the full logits, losses.sparse_kd_loss), for the gain to show. At
  4 × 1,024 it would need ~14 GB, past the 5 GB a process may take on this shared machine, so it runs as 4
  micro-batches of 1 × 1,024 with gradient accumulation (the same 4,096 tokens per optimizer step).

Step time: the median wall time per optimizer step, over the steps after the first (a warm-up) when there are more
than two (a step takes about a minute here: the first is within 2 % of the next). Peak memory:
the process's resident set sampled every 5 ms during training, its maximum minus the RSS right before training.
Prints the figures, then, last, one JSON line: ``memory_ratio`` (kd / sft peak over start, goal <= 1.0) and
``time_ratio`` (kd / sft step time, goal <= 1.15).

    python benchmarks/kd_large_vocab.py [--reps 2] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import options, save

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 151_936, 256, 2, 4, 2, 512
ROWS, LENGTH, PROMPT, K = 4, 1024, 64, 50
SIDES = ("sft", "kd", "dense")


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Sampler:
    """The highest RSS seen every 5 ms while running (a step's peak lies inside its backward, not at its end)."""

    def __init__(self):
        self.peak, self.running = rss_mb(), True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.005)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak


def student():
    """kdflow's Qwen2 builder (Qwen2.5's architecture and 151,936-row tied embedding), shrunk: the LM head is what
    matters at this vocabulary, and a CPU step then takes a minute, not an hour."""
    import torch

    from kdflow.training.tiny_models import qwen2_model

    return qwen2_model(
        None,
        seed=0,
        dtype=torch.bfloat16,
        hidden=HIDDEN,
        layers=LAYERS,
        heads=HEADS,
        kv_heads=KV_HEADS,
        intermediate=INTERMEDIATE,
    )


def rows() -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [
        {"row_id": f"r{i}", "input_ids": torch.randint(3, VOCAB, (LENGTH,), generator=g).tolist(), "start": PROMPT}
        for i in range(ROWS)
    ]


class SyntheticTeacher:
    """The offline-KD collator's output for a batch of rows, with a synthetic top-k (k = 50) at every answer
    position in place of a cache read (the cost measured is the step's, not the disk's)."""

    def __call__(self, examples):
        import torch

        B, L = len(examples), LENGTH
        g = torch.Generator().manual_seed(int(examples[0]["row_id"][1:]))
        ids = torch.tensor([e["input_ids"] for e in examples])
        labels = ids.clone()
        labels[:, : PROMPT + 1] = -100
        mask = torch.zeros(B, L, dtype=torch.bool)
        mask[:, PROMPT : L - 1] = True
        logprobs = torch.log_softmax(torch.randn(B, L, K, generator=g), -1).sort(-1, descending=True).values - 0.5
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "teacher_ids": torch.randint(0, VOCAB, (B, L, K), generator=g),
            "teacher_logprobs": logprobs,
            "teacher_tail": torch.log1p(-logprobs.exp().sum(-1)),
            "teacher_mask": mask,
        }


def child(side: str, steps: int, threads: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import kdflow.training.offline_kd as offline_kd
    from benchmarks.step_timer import StepTimer
    from kdflow.training.tiny_models import train_tokenizer

    torch.set_num_threads(threads)

    model, data, timer = student(), rows(), StepTimer()
    tokenizer = train_tokenizer(["the student reads the teacher"], 64)  # a processing class; the rows are ids
    micro, accumulate = (1, ROWS) if side == "dense" else (ROWS, 1)
    args = (SFTConfig if side == "sft" else offline_kd.OfflineKDConfig)(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulate,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=LENGTH,
        disable_tqdm=True,
        remove_unused_columns=side == "sft",
        dataset_kwargs={"skip_prepare_dataset": side != "sft"},
        **({} if side == "sft" else {"logit_cache": "synthetic"}),  # the collator makes the teacher's side up
    )
    if side == "sft":
        sft_rows = [
            {"input_ids": r["input_ids"], "completion_mask": [0] * (PROMPT + 1) + [1] * (LENGTH - PROMPT - 1)}
            for r in data
        ]
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(sft_rows),
            processing_class=tokenizer,
            callbacks=[timer],
        )
    else:
        if side == "dense":
            offline_kd.fused_head = lambda model, rows: None
        trainer = offline_kd.CachedKDTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(data),
            processing_class=tokenizer,
            data_collator=SyntheticTeacher(),
            callbacks=[timer],
        )
    before = rss_mb()
    sampler = Sampler()
    trainer.train()
    peak = sampler.stop()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = timer.times[1:] if len(timer.times) > 2 else timer.times  # a warm-up step only when there are several
    return {
        "step_s": statistics.median(timed),
        "steps_s": timer.times,
        "peak_over_start_mb": peak - before,
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "loss": losses,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        side, steps, threads, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
        print(json.dumps(child(side, steps, threads, out)))
        return
    args = options(__doc__, reps=2, steps=3, threads=2)
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for side in SIDES:  # alternating: drifting load on the shared machine hits every side alike
                done = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        side,
                        str(args.steps),
                        str(args.threads),
                        str(Path(tmp) / side),
                    ],
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
                runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
                r = runs[side][-1]
                print(
                    f"rep {rep} {side:>5}: {r['step_s']:.1f} s/step, peak {r['peak_over_start_mb']:.0f} MB over "
                    f"start ({r['peak_rss_mb']:.0f} MB RSS), loss {r['loss']}",
                    flush=True,
                )
    med = {
        s: {k: statistics.median(r[k] for r in runs[s]) for k in ("step_s", "peak_over_start_mb", "peak_rss_mb")}
        for s in SIDES
    }
    ratios = {
        "memory_ratio": med["kd"]["peak_over_start_mb"] / med["sft"]["peak_over_start_mb"],
        "time_ratio": med["kd"]["step_s"] / med["sft"]["step_s"],
    }
    machine = f"{platform.machine()} CPU, {args.threads} torch threads, {platform.python_version()}"
    setup = (
        f"V = {VOCAB:,}, Qwen2 student hidden {HIDDEN}, {LAYERS} layers, {HEADS}/{KV_HEADS} heads, tied "
        f"embedding, bf16 weights (softmax and divergence in fp32), batch {ROWS} x {LENGTH} tokens "
        f"({LENGTH - PROMPT - 1} answer positions per row), k = {K}; {machine}"
    )
    print(setup)
    for s in SIDES:
        print(
            f"{s:>5}: {med[s]['step_s']:.1f} s/step, peak {med[s]['peak_over_start_mb']:.0f} MB over start "
            f"({med[s]['peak_rss_mb']:.0f} MB RSS)" + ("  [4 micro-batches of 1 x 1,024]" if s == "dense" else "")
        )
    print(
        f"dense/sft: {med['dense']['step_s'] / med['sft']['step_s']:.2f}x time, "
        f"{med['dense']['peak_over_start_mb'] / med['sft']['peak_over_start_mb']:.2f}x memory"
    )
    save("kd_large_vocab", {"setup": setup, "args": vars(args), "runs": runs, "medians": med, "ratios": ratios})
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
