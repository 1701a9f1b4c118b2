"""Stage 5: how good each model is (evaluate_model, one per model), what each costs to run
(measure_deployment, all models back to back), an LLM judge's win rate of each student against the teacher
where the recipe names a judge (judge_students), and lm-evaluation-harness where it can run (run_lm_eval)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from kdflow.teacher import api_keys

from kdflow.evaluation import deployment
from kdflow.teacher.answer_shards import ShardWriter, read_shards
from kdflow.evaluation.quality import (accuracy, judge_pairs, judge_prompts, judgement, reference_sequences, same_vocabulary,
                             sampled_pass_at_k, score_reference, win_rate)
from kdflow.teacher.hf_generate import generate, load
from kdflow.store.model_folders import model_location
from kdflow.teacher.api_client import Accounting, Sampling, TeacherRequest, run_all
from kdflow.store.outputs import OutputRef, content_key
from kdflow.store.stage import Stage
from kdflow.store.run_folder import read_split
from kdflow.config.templates import render
from kdflow.config.data import DataSource
from kdflow.config.evaluation import EvaluationSection
from kdflow.config.fields import redact_url
from kdflow.config.generation import Backend
from kdflow.training.tiny_models import count_params
from kdflow.teacher.vllm_server import vllm_server
from tasks.caching import STAGE_RESULTS, StageCache
from tasks.curate import answer_checker

EVALUATE = Stage("evaluate", "2", lambda section, template, source, model, teacher, data: {
    "section": section, "template": template, "source": source.value, "model": model, "teacher": teacher,
    "data": data})


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


# Its task run name is given by the flow (``.with_options``): only the flow knows which model this is.
@task(cache_policy=StageCache(EVALUATE), **STAGE_RESULTS)
def evaluate_model(run_dir: Path, section: EvaluationSection, template: str, source: DataSource,
                   model: OutputRef, teacher: OutputRef, data: OutputRef) -> OutputRef:
    """``teacher``: the reference for agreement (pass the teacher itself when evaluating the teacher)."""
    out = EVALUATE.output(run_dir, section=section, template=template, source=source, model=model, teacher=teacher,
                          data=data)
    if out.done:
        return out.done
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
    with out.building() as tmp:
        pd.DataFrame(predictions).to_parquet(tmp / "predictions.parquet", index=False)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        out.finish(tmp, rows=len(rows), metrics=metrics)
    return out.ref()


DEPLOYMENT = Stage("deployment", "1", lambda models, settings, template, data, split: {
    "models": models, "settings": settings, "template": template, "data": data, "split": split})


def flops(config, context: float) -> dict:
    """FLOPs per token, or why the formula does not apply to this architecture (the other figures stand)."""
    try:
        return {"flops_per_token": deployment.flops_per_token(config, context)}
    except ValueError as e:
        return {"flops_per_token": None, "flops_skipped": str(e)}


@task(cache_policy=StageCache(DEPLOYMENT), **STAGE_RESULTS,
      task_run_name=lambda parameters: f"measure_deployment[{', '.join(parameters['models'])}]")
def measure_deployment(run_dir: Path, models: dict[str, OutputRef], settings: EvaluationSection.Deployment,
                       template: str, data: OutputRef, split: str) -> OutputRef:
    """Parameters, FLOPs/token, size on disk, peak memory, latency and throughput of every model, measured
    back to back here (never one model per run: timings of different runs or machines do not compare).
    Prompts: the first questions of ``split``."""
    out = DEPLOYMENT.output(run_dir, models=models, settings=settings, template=template, data=data, split=split)
    if out.done:
        return out.done
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
    with out.building() as tmp:
        (tmp / "deployment.json").write_text(json.dumps(figures, indent=2))
        out.finish(tmp, rows=len(figures), figures=figures, machine=deployment.machine(),
                   settings=settings.model_dump(), flops_formula=deployment.FLOPS_FORMULA)
    return out.ref()


# The judge's template text is in the section (a computed field), hence in the key: editing the prompt re-judges.
JUDGE = Stage("judge", "1", lambda section, students, teacher, data, split: {
    "section": section, "students": students, "teacher": teacher, "data": data, "split": split})


class TooManyJudgeFailures(RuntimeError):
    """More judge requests failed for good than evaluation.judge.max_failure_fraction allows."""


def reply_folder(run_dir: Path, section: EvaluationSection.Judge) -> Path:
    """Where this judge's replies are persisted as they arrive (``kdflow.teacher.answer_shards``), one per prompt, keyed
    by the prompt's hash: a crash, a rerun or a new student asks the judge nothing it has answered already.
    Kept after the stage (hidden, so no stage output): judge calls cost money."""
    judge = {k: getattr(section, k) for k in ("backend", "model", "max_new_tokens")} | {
        "base_url": redact_url(section.base_url)}  # a password in the URL is no part of what was judged
    who = content_key("judge-replies", JUDGE.version, {**judge, "vllm_args": section.vllm.extra_args})
    return Path(run_dir) / JUDGE.name / f".replies-{who[:16]}"


def prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:32]


def judge_api_key(section: EvaluationSection.Judge) -> str | None:
    """The key from the Prefect Secret block or environment variable the recipe names (the value never is)."""
    if section.api_key_secret_block:
        from prefect.blocks.system import Secret

        return Secret.load(section.api_key_secret_block).get()
    return api_keys.from_env(section.api_key_env, "evaluation.judge.api_key_env")


def _ask(section: EvaluationSection.Judge, todo: dict[str, str], shard: ShardWriter) -> Accounting:
    """Ask the judge every prompt of ``todo`` (id -> prompt), greedy, appending each reply to ``shard``."""
    if section.backend is Backend.hf:
        net, tokenizer = load(section.model)
        start = time.perf_counter()
        outputs = generate(net, tokenizer, list(todo.values()), section.max_new_tokens, section.batch_size)
        for i, o in zip(todo, outputs):
            shard.append({"id": i, "sample": 0, "ok": True, **o})
        return Accounting(requests=len(todo), answers=len(todo), seconds=time.perf_counter() - start,
                          completion_tokens=sum(o["completion_tokens"] for o in outputs))
    requests = [TeacherRequest(id=i, sample=0, messages=[{"role": "user", "content": p}]) for i, p in todo.items()]
    sampling = Sampling(model=section.model, max_tokens=section.max_new_tokens)
    run = {"concurrency": section.concurrency, "max_retries": section.max_retries, "on_record": shard.append}
    if section.backend is Backend.vllm:  # served under its path, the name the requests use
        v = section.vllm
        with vllm_server(section.model, port=v.port, extra_args=v.server_args(), python=v.python,
                         startup_timeout_s=v.startup_timeout_s) as base_url:
            return run_all(base_url, None, section.timeout_s, requests, sampling, **run)
    return run_all(section.base_url, judge_api_key(section), section.timeout_s, requests, sampling, **run)


def ask_judge(section: EvaluationSection.Judge, prompts: list[str], folder: Path) -> tuple[dict[str, dict], Accounting]:
    """The judge's reply record (``ok`` True with ``text``, or a failure with its ``reason``) to every prompt, by
    ``prompt_id``. Only prompts ``folder`` holds no reply to are asked; no server starts when there are none."""
    ids = {prompt_id(p): p for p in prompts}
    answered, _ = read_shards(folder)
    todo = {i: p for i, p in ids.items() if (i, 0) not in answered}
    acct = Accounting(resumed=len(ids) - len(todo))
    if todo:
        with ShardWriter(folder) as shard:
            acct = _ask(section, todo, shard)
        acct.resumed = len(ids) - len(todo)
    answered, failed = read_shards(folder)
    return {i: answered.get((i, 0)) or failed[(i, 0)] for i in ids}, acct


def check_judge_failures(judgements: list[dict], section: EvaluationSection.Judge, folder: Path) -> None:
    failed = [j for j in judgements if j["text"] is None]
    if failed and len(failed) / len(judgements) > section.max_failure_fraction:
        reasons = dict(Counter(j["reason"] for j in failed))
        raise TooManyJudgeFailures(
            f"{len(failed)} of {len(judgements)} judge requests failed for good ({len(failed) / len(judgements):.1%} > "
            f"evaluation.judge.max_failure_fraction {section.max_failure_fraction:.1%}); by reason {reasons}; first: "
            f"{failed[0]['error']}. The replies received are kept in {folder}: a rerun asks only for the others")


def predictions(evaluation: OutputRef) -> list[dict]:
    """A model's greedy answers (``id``, ``text``, ...) from its evaluate-stage output."""
    return pd.read_parquet(Path(evaluation.path) / "predictions.parquet").to_dict("records")


@task(cache_policy=StageCache(JUDGE), **STAGE_RESULTS,
      task_run_name="judge_students[{section.backend.value} {section.model}]")
def judge_students(run_dir: Path, section: EvaluationSection.Judge, students: dict[str, OutputRef],
                   teacher: OutputRef, data: OutputRef, split: str) -> OutputRef:
    """Each student's win rate against the teacher, by an LLM judge, on the first questions of ``split``.

    ``students`` and ``teacher``: evaluate-stage outputs; their greedy answers (``predictions.parquet``) are
    what is judged, so nothing is generated again. Each pair is judged in both orders. One output for all
    students (a local judge is started once); replies are kept by prompt (``reply_folder``), so a new student
    costs only its own judgements. Output: ``judgements.parquet`` (every judgement with the judge's raw reply,
    its verdict, the student's outcome, or the reason it has none) and ``win_rates.json`` per student."""
    out = JUDGE.output(run_dir, section=section, students=students, teacher=teacher, data=data, split=split)
    if out.done:
        return out.done
    questions, reference = read_split(data, split), predictions(teacher)
    items = {name: judge_prompts(section.template_text,
                                 judge_pairs(questions, predictions(ref), reference, section.max_questions))
             for name, ref in students.items()}
    folder = reply_folder(run_dir, section)
    replies, acct = ask_judge(section, [i["prompt"] for its in items.values() for i in its], folder)
    judgements = [{"student": name, **judgement(i, replies[prompt_id(i["prompt"])])}
                  for name, its in items.items() for i in its]
    check_judge_failures(judgements, section, folder)
    results = {name: win_rate([j for j in judgements if j["student"] == name]) for name in students}
    with out.building() as tmp:
        pd.DataFrame(judgements).to_parquet(tmp / "judgements.parquet", index=False)
        (tmp / "win_rates.json").write_text(json.dumps(results, indent=2))
        out.finish(tmp, rows=len(judgements), win_rates=results, split=split,
               questions=len(next(iter(items.values()), [])) // 2,
               judge={"backend": section.backend.value, "model": section.model,
                      "base_url": redact_url(section.base_url), "template": section.template},
               accounting=acct.as_dict())
    return out.ref()


# The harness's version is content: a new release may score differently.
LM_EVAL = Stage("lm-eval", "1", lambda models, settings: {
    "models": models, "settings": settings, "lm_eval": importlib.metadata.version("lm_eval")})


def lm_eval_unavailable() -> str | None:
    """Why lm-evaluation-harness cannot run here, or None when it can."""
    if importlib.util.find_spec("lm_eval") is None:
        return "lm-evaluation-harness is not installed (pip install lm-eval; it is not a default dependency)"
    if not torch.cuda.is_available():
        return "no CUDA GPU: lm-evaluation-harness benchmarks are for real-scale models on a GPU"
    return None


# Not Prefect-cached: a skip must be re-decided every run (the package or a GPU may be there next time); a run
# that happened finds its own finished output by key.
@task(cache_policy=NO_CACHE, task_run_name=lambda parameters: f"run_lm_eval[{', '.join(parameters['models'])}]")
def run_lm_eval(run_dir: Path, models: dict[str, OutputRef], settings: EvaluationSection.LmEval) -> dict:
    """``{"status": "off" | "skipped" | "done", "reason"?, "results"?: {model: {task: {metric: value}}}}``."""
    if not settings.enabled:
        return {"status": "off", "reason": "evaluation.lm_eval.enabled is false in the recipe"}
    if why := lm_eval_unavailable():
        get_run_logger().warning(f"lm-evaluation-harness skipped: {why}")
        return {"status": "skipped", "reason": why}
    import lm_eval

    out = LM_EVAL.output(run_dir, models=models, settings=settings)
    if not (done := out.done):
        results = {}
        for name, ref in models.items():
            out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": model_location(ref), "dtype": "auto"},
                                          tasks=settings.tasks, num_fewshot=settings.num_fewshot, limit=settings.limit,
                                          batch_size="auto", device="cuda")
            results[name] = {t: {m: v for m, v in r.items() if isinstance(v, (int, float)) and "stderr" not in m}
                             for t, r in out["results"].items()}
        with out.building() as tmp:
            (tmp / "results.json").write_text(json.dumps(results, indent=2))
            out.finish(tmp, rows=len(results))
        done = out.ref()
    return {"status": "done", "results": json.loads((Path(done.path) / "results.json").read_text()),
            "tasks": settings.tasks, "limit": settings.limit}
