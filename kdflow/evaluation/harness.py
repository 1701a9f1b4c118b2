"""lm-evaluation-harness benchmarks, where they can run (the package installed, a CUDA GPU): for real-scale models."""

from __future__ import annotations

import importlib.util

import torch

RESULTS = "results.json"  # the lm-eval stage's output: {model: {task: {metric: value}}}


def unavailable() -> str | None:
    """Why lm-evaluation-harness cannot run here, or None when it can."""
    if importlib.util.find_spec("lm_eval") is None:
        return "lm-evaluation-harness is not installed (pip install lm-eval; it is not a default dependency)"
    if not torch.cuda.is_available():
        return "no CUDA GPU: lm-evaluation-harness benchmarks are for real-scale models on a GPU"
    return None


def run(model_dirs: dict[str, str], tasks: list[str], num_fewshot: int | None, limit) -> dict:
    """{model: {task: {metric: value}}}, the numeric metrics without their stderr."""
    import lm_eval

    results = {}
    for name, model_dir in model_dirs.items():
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": model_dir, "dtype": "auto"},
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size="auto",
            device="cuda",
        )
        results[name] = {
            t: {m: v for m, v in r.items() if isinstance(v, (int, float)) and "stderr" not in m}
            for t, r in out["results"].items()
        }
    return results
