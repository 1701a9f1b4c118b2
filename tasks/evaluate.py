"""Stage 5: how good each model is (evaluate_model, one per model), what each costs to run
(measure_deployment, all models back to back), and lm-evaluation-harness where it can run (run_lm_eval)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from kdflow import deployment
from kdflow.evaluate import accuracy, reference_sequences, same_vocabulary, sampled_pass_at_k, score_reference
from kdflow.generate_hf import load
from kdflow.models import model_location
from kdflow.outputs import OutputRef, building, existing_output, finish
from kdflow.prompts import render
from kdflow.recipe import DataSource, EvaluationSection
from kdflow.tiny_models import count_params
from tasks.caching import StageCache, stage_key
from tasks.curate import answer_checker
from tasks.data import read_split

STAGE, VERSION = "evaluate", "2"


def reference_metrics(net, tokenizer, teacher: OutputRef, model: OutputRef, rows: list[dict], template: str,
                      batch_size: int) -> dict:
    """Perplexity on the split's gold rationales, and agreement with the teacher where the vocabularies match."""
    sequences = reference_sequences(tokenizer, rows, template)
    if teacher == model:  # the teacher itself: agreement 1 and KL 0 by definition, and measured so
        return score_reference(net, tokenizer, sequences, batch_size, teacher=net)
    t_net, t_tokenizer = load(model_location(teacher))
    if not same_vocabulary(tokenizer, t_tokenizer):
        return {**score_reference(net, tokenizer, sequences, batch_size),
                "agreement_skipped": "the student's tokenizer differs from the teacher's"}
    return score_reference(net, tokenizer, sequences, batch_size, teacher=t_net)


@task(cache_policy=StageCache(STAGE, VERSION), persist_result=True)
def evaluate_model(run_dir: Path, section: EvaluationSection, template: str, source: DataSource,
                   model: OutputRef, teacher: OutputRef, data: OutputRef) -> OutputRef:
    """``teacher``: the reference for agreement (pass the teacher itself when evaluating the teacher)."""
    inputs = {"section": section, "template": template, "source": source.value, "model": model, "teacher": teacher,
              "data": data}
    key = stage_key(STAGE, VERSION, inputs)
    if done := existing_output(run_dir, STAGE, key):
        return done
    rows = read_split(data, section.split)
    net, tokenizer = load(model_location(model))
    check = answer_checker(source)[0]
    start = time.perf_counter()
    acc, predictions = accuracy(net, tokenizer, rows, template, check, section.max_new_tokens, section.batch_size)
    metrics = {"accuracy": acc, "params": count_params(net), "rows": len(rows), "split": section.split}
    if section.pass_at_k:
        metrics["pass_at_k"], correct = sampled_pass_at_k(net, tokenizer, rows, template, check, section.pass_at_k,
                                                          section.pass_samples, section.temperature,
                                                          section.max_new_tokens, section.batch_size)
        metrics |= {"k": section.pass_at_k, "samples": section.pass_samples}
        predictions = [{**p, "correct_samples": c} for p, c in zip(predictions, correct)]
    metrics |= reference_metrics(net, tokenizer, teacher, model, rows, template, section.batch_size)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    with building(run_dir, STAGE, key) as tmp:
        pd.DataFrame(predictions).to_parquet(tmp / "predictions.parquet", index=False)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        finish(tmp, STAGE, key, inputs=inputs, rows=len(rows), metrics=metrics)
    return existing_output(run_dir, STAGE, key)


DEPLOY_STAGE, DEPLOY_VERSION = "deployment", "1"


def flops(config, context: float) -> dict:
    """FLOPs per token, or why the formula does not apply to this architecture (the other figures stand)."""
    try:
        return {"flops_per_token": deployment.flops_per_token(config, context)}
    except ValueError as e:
        return {"flops_per_token": None, "flops_skipped": str(e)}


@task(cache_policy=StageCache(DEPLOY_STAGE, DEPLOY_VERSION), persist_result=True)
def measure_deployment(run_dir: Path, models: dict[str, OutputRef], settings: EvaluationSection.Deployment,
                       template: str, data: OutputRef, split: str) -> OutputRef:
    """Parameters, FLOPs/token, size on disk, peak memory, latency and throughput of every model, measured
    back to back here (never one model per run: timings of different runs or machines do not compare).
    Prompts: the first questions of ``split``."""
    inputs = {"models": models, "settings": settings, "template": template, "data": data, "split": split}
    key = stage_key(DEPLOY_STAGE, DEPLOY_VERSION, inputs)
    if done := existing_output(run_dir, DEPLOY_STAGE, key):
        return done
    rows = read_split(data, split)
    prompts = [render(template, question=r["question"]) for r in rows[: settings.throughput_batch]]
    prompts += prompts[-1:] * (settings.throughput_batch - len(prompts))  # a split smaller than the batch
    loaded = {name: load(model_location(ref)) for name, ref in models.items()}
    if torch.cuda.is_available():  # cost is measured on the device the models would be served from
        loaded = {name: (net.to("cuda"), tok) for name, (net, tok) in loaded.items()}
    measured = deployment.measure_all(loaded, prompts[0], prompts, settings.latency_tokens, settings.repeats)
    figures = {name: {"params": count_params(net), **flops(net.config, measured[name]["context"]),
                      "size_bytes": deployment.size_on_disk(model_location(models[name])), **measured[name]}
               for name, (net, _) in loaded.items()}
    with building(run_dir, DEPLOY_STAGE, key) as tmp:
        (tmp / "deployment.json").write_text(json.dumps(figures, indent=2))
        finish(tmp, DEPLOY_STAGE, key, inputs=inputs, rows=len(figures), figures=figures, machine=deployment.machine(),
               settings=settings.model_dump(), flops_formula=deployment.FLOPS_FORMULA)
    return existing_output(run_dir, DEPLOY_STAGE, key)


LM_EVAL_STAGE, LM_EVAL_VERSION = "lm-eval", "1"


def lm_eval_unavailable() -> str | None:
    """Why lm-evaluation-harness cannot run here, or None when it can."""
    if importlib.util.find_spec("lm_eval") is None:
        return "lm-evaluation-harness is not installed (pip install lm-eval; it is not a default dependency)"
    if not torch.cuda.is_available():
        return "no CUDA GPU: lm-evaluation-harness benchmarks are for real-scale models on a GPU"
    return None


# Not Prefect-cached: a skip must be re-decided every run (the package or a GPU may be there next time); a run
# that happened finds its own finished output by key.
@task(cache_policy=NO_CACHE)
def run_lm_eval(run_dir: Path, models: dict[str, OutputRef], settings: EvaluationSection.LmEval) -> dict:
    """``{"status": "off" | "skipped" | "done", "reason"?, "results"?: {model: {task: {metric: value}}}}``."""
    if not settings.enabled:
        return {"status": "off", "reason": "evaluation.lm_eval.enabled is false in the recipe"}
    if why := lm_eval_unavailable():
        get_run_logger().warning(f"lm-evaluation-harness skipped: {why}")
        return {"status": "skipped", "reason": why}
    import lm_eval

    inputs = {"models": models, "settings": settings, "lm_eval": importlib.metadata.version("lm_eval")}
    key = stage_key(LM_EVAL_STAGE, LM_EVAL_VERSION, inputs)
    if not (done := existing_output(run_dir, LM_EVAL_STAGE, key)):
        results = {}
        for name, ref in models.items():
            out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": model_location(ref), "dtype": "auto"},
                                          tasks=settings.tasks, num_fewshot=settings.num_fewshot, limit=settings.limit,
                                          batch_size="auto", device="cuda")
            results[name] = {t: {m: v for m, v in r.items() if isinstance(v, (int, float)) and "stderr" not in m}
                             for t, r in out["results"].items()}
        with building(run_dir, LM_EVAL_STAGE, key) as tmp:
            (tmp / "results.json").write_text(json.dumps(results, indent=2))
            finish(tmp, LM_EVAL_STAGE, key, inputs=inputs, rows=len(results))
        done = existing_output(run_dir, LM_EVAL_STAGE, key)
    return {"status": "done", "results": json.loads((Path(done.path) / "results.json").read_text()),
            "tasks": settings.tasks, "limit": settings.limit}
