"""Stage 5a: post-training quantized copies of the students (recipe ``evaluation.quantize``), each then evaluated and
measured like any other model (``<student>-int8``): KD and quantization side by side."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task

from kdflow.evaluation import quantize
from kdflow.store.model_folders import MODEL, SOURCE, model_location, write_location
from kdflow.store.outputs import OutputRef
from kdflow.store.stage import Stage
from tasks.caching import STAGE_RESULTS, StageCache

# The quantizer is torch's: its version is content (another release may round or pack differently).
QUANTIZE = Stage(
    "quantize",
    "1",
    lambda method, model: {"method": method, "model": model, "torch": torch.__version__},
    files=(SOURCE, f"{MODEL}/"),
)


def quantized_name(name: str, method: str) -> str:
    """``seq-kd`` -> ``seq-kd-int8``; with seeds ``seq-kd@1`` -> ``seq-kd-int8@1`` (grouped over seeds as its own
    model)."""
    base, at, seed = name.partition("@")
    return f"{base}-{method}{at}{seed}"


@task(cache_policy=StageCache(QUANTIZE), **STAGE_RESULTS)
def quantize_model(run_dir: Path, method: str, model: OutputRef) -> OutputRef:
    """``model``: a trained student's output; returns a model output (``model.json`` -> ``model/``) like it."""
    if method not in quantize.METHODS:
        raise ValueError(f"evaluation.quantize: unknown method {method!r}; use one of {list(quantize.METHODS)}")
    out = QUANTIZE.output(run_dir, method=method, model=model)
    if done := out.done:
        return done
    with out.building() as tmp:
        info = quantize.save_int8(model_location(model), tmp / MODEL)
        write_location(tmp, MODEL)
        out.finish(tmp, quantization=info)
    return out.ref()


def quantize_students(run_dir: Path, methods: list[str], students: dict[str, OutputRef]) -> dict[str, OutputRef]:
    """Every student once per method, named after it (``quantize_model[seq-kd-int8]``)."""
    return {
        quantized_name(name, m): quantize_model.with_options(
            task_run_name=f"quantize_model[{quantized_name(name, m)}]"
        )(run_dir, m, ref)
        for m in methods
        for name, ref in students.items()
    }
