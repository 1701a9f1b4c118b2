"""Stage 5: how good each model is (evaluate_model, one per model: accuracy, or ROUGE-L on instruction data;
evaluate_api_teacher for an API teacher, through its API: accuracy or ROUGE-L only), what each costs to run
(measure_deployment, all models back to back), an LLM judge's win rate of each student against the teacher
where the recipe names a judge (judge_students), and lm-evaluation-harness where it can run (run_lm_eval)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data.checkers import answer_checker
from kdflow.config.data import DataSource
from kdflow.config.evaluation import EvaluationSection
from kdflow.config.fields import redact_url
from kdflow.config.generation import ApiSection, Backend, GenerationSection
from kdflow.config.templates import render
from kdflow.evaluation import deployment, harness
from kdflow.evaluation.api_model import IMPORTED_ONLY, WEIGHTS_UNAVAILABLE, api_accuracy, api_rouge_l
from kdflow.evaluation.free_text import evaluate_free_text
from kdflow.evaluation.judge import (
    JUDGEMENTS,
    WIN_RATES,
    ask_judge,
    backend,
    check_judge_failures,
    predictions,
    prompt_id,
)
from kdflow.evaluation.model_metrics import METRICS, PREDICTIONS, evaluate
from kdflow.evaluation.quality import judge_pairs, judge_prompts, judgement, win_rate
from kdflow.evaluation.traffic import TRAFFIC_FORMULA
from kdflow.store.model_folders import keyed_by_content, model_location
from kdflow.store.outputs import OutputRef, content_key
from kdflow.store.run_folder import read_split
from kdflow.store.stage import Stage
from kdflow.teacher.answer_shards import adopt_folder
from kdflow.teacher.completion import TeacherBackend
from kdflow.teacher.served import served_identity
from tasks.api_keys import read_api_key, served
from tasks.caching import STAGE_RESULTS, StageCache

# ``teacher_eval`` (instruction data: the teacher's evaluation, whose answers a student is scored on) is in the key only
# where it is passed, so that the other sources' keys are as they were.
EVALUATE = Stage(
    "evaluate",
    "2",
    lambda section, template, source, model, teacher, data, teacher_eval=None: {
        "section": section,
        "template": template,
        "source": source.value,
        "model": model,
        "teacher": teacher,
        "data": data,
        **({"teacher_eval": teacher_eval} if teacher_eval is not None else {}),
    },
    files=(PREDICTIONS, METRICS),
)


# Its task run name is given by the flow (``.with_options``): only the flow knows which model this is.
@task(cache_policy=StageCache(EVALUATE), **STAGE_RESULTS)
def evaluate_model(
    run_dir: Path,
    section: EvaluationSection,
    template: str,
    source: DataSource,
    model: OutputRef,
    teacher: OutputRef,
    data: OutputRef,
    teacher_eval: OutputRef | None = None,
) -> OutputRef:
    """``teacher``: the reference for agreement (pass the teacher itself when evaluating the teacher);
    ``teacher_eval``: for instruction data, the teacher's evaluate output on the same split: agreement and KL are
    measured on its greedy answers (none of which any student trained on)."""
    out = EVALUATE.output(
        run_dir,
        section=section,
        template=template,
        source=source,
        model=model,
        teacher=teacher,
        data=data,
        teacher_eval=teacher_eval,
    )
    if done := out.done:
        return done
    rows = read_split(data, section.split)
    no_teacher = absent_teacher(teacher)  # an API teacher, or only an imported dataset's: nothing to agree with
    teacher_dir = None if teacher == model or no_teacher else model_location(teacher)
    if source is DataSource.instructions:
        answers = None if teacher_eval is None else predictions(teacher_eval)
        metrics, predicted = evaluate_free_text(
            model_location(model), teacher_dir, rows, template, section, answers, no_teacher
        )
    else:
        metrics, predicted = evaluate(
            model_location(model), teacher_dir, rows, template, answer_checker(source)[0], section, no_teacher
        )
    with out.building() as tmp:
        pd.DataFrame(predicted).to_parquet(tmp / PREDICTIONS, index=False)
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2))
        out.finish(tmp, rows=len(rows), metrics=metrics)
    return out.ref()


# The same stage folder as evaluate_model (its predictions serve the judge alike); the API's identity is the model,
# and it is asked as it was for the students' answers (the generation template, else the CoT one; the system prompt).
# The served model's card too (tasks/api_keys.served): another model under the same name and URL is evaluated anew.
API_EVALUATE = Stage(
    "evaluate",
    "2",
    lambda section, template, source, generation, teacher, data: {
        "section": section,
        "template": generation.template_text or template,
        "source": source.value,
        "api": generation.api.identity(),
        "system_prompt": generation.system_prompt,
        "teacher": teacher,
        "data": data,
        **served(generation),
    },
    files=(PREDICTIONS, METRICS),
)


def absent_teacher(teacher: OutputRef) -> str | None:
    """Why the teacher's weights are not here to agree with (an API model; a model known only by an imported logit
    dataset), or None when they are."""
    m = teacher.manifest()
    return WEIGHTS_UNAVAILABLE if m.get("api") else IMPORTED_ONLY if m.get("imported") else None


def teacher_api_key(api: ApiSection) -> str | None:
    """The API teacher's key, as the generate stage reads it (Secret block or environment variable)."""
    return read_api_key(api.api_key_secret_block, api.api_key_env, "generation.api.api_key_env")


class TooManyApiFailures(RuntimeError):
    """More of the API teacher's evaluation requests failed for good than generation.api.max_failure_fraction allows."""


@task(
    cache_policy=StageCache(API_EVALUATE), **STAGE_RESULTS, task_run_name="evaluate_api_teacher[{generation.api.model}]"
)
def evaluate_api_teacher(
    run_dir: Path,
    section: EvaluationSection,
    template: str,
    source: DataSource,
    generation: GenerationSection,
    teacher: OutputRef,
    data: OutputRef,
) -> OutputRef:
    """The API teacher's accuracy on ``section.split`` (ROUGE-L on instruction data): greedy, through its API, scored
    as the students' answers are. Replies are kept by prompt beside the stage (hidden, as the judge's are): API calls
    cost money."""
    out = API_EVALUATE.output(
        run_dir, section=section, template=template, source=source, generation=generation, teacher=teacher, data=data
    )
    if done := out.done:
        return done
    api, rows = generation.api, read_split(data, section.split)
    model = TeacherBackend(
        Backend.openai,
        api.model,
        base_url=api.base_url,
        api_key=lambda: teacher_api_key(api),
        timeout_s=api.timeout_s,
        concurrency=api.concurrency,
        max_retries=api.max_retries,
    )
    asked = {**api.identity(), "max_new_tokens": section.max_new_tokens, "system_prompt": generation.system_prompt}
    folder, legacy = (
        Path(run_dir) / API_EVALUATE.name / f".replies-{key[:16]}"
        for key in (
            content_key("api-replies", API_EVALUATE.version, who) for who in ({**asked, **served(generation)}, asked)
        )
    )
    adopt_folder(legacy, folder)  # replies kept before the served model's card named the folder are this model's
    if source is DataSource.instructions:
        metrics, predicted, acct = api_rouge_l(
            model, rows, out.inputs["template"], section.max_new_tokens, folder, generation.system_prompt
        )
    else:
        metrics, predicted, acct = api_accuracy(
            model,
            rows,
            out.inputs["template"],
            answer_checker(source)[0],
            section.max_new_tokens,
            folder,
            generation.system_prompt,
        )
    if metrics["failed"] > api.max_failure_fraction * len(rows):
        raise TooManyApiFailures(
            f"{metrics['failed']} of {len(rows)} requests to the API teacher failed for good "
            f"(> generation.api.max_failure_fraction {api.max_failure_fraction:.1%}); the replies "
            f"received are kept in {folder}: a rerun asks only for the others"
        )
    metrics |= {"split": section.split, "model": api.model, "api": api.identity(), "weights": WEIGHTS_UNAVAILABLE}
    with out.building() as tmp:
        pd.DataFrame(predicted).to_parquet(tmp / PREDICTIONS, index=False)
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2))
        out.finish(tmp, rows=len(rows), metrics=metrics, accounting=acct.as_dict(), served=out.inputs.get("served"))
    return out.ref()


# 2: memory traffic per token, arithmetic intensity and measured energy (where a counter is readable) added.
DEPLOYMENT = Stage(
    "deployment",
    "2",
    lambda models, settings, template, data, split: {
        "models": models,
        "settings": settings,
        "template": template,
        "data": data,
        "split": split,
    },
    files=(deployment.FIGURES,),
)


@task(
    cache_policy=StageCache(DEPLOYMENT),
    **STAGE_RESULTS,
    task_run_name=lambda parameters: f"measure_deployment[{', '.join(parameters['models'])}]",
)
def measure_deployment(
    run_dir: Path,
    models: dict[str, OutputRef],
    settings: EvaluationSection.Deployment,
    template: str,
    data: OutputRef,
    split: str,
) -> OutputRef:
    """Parameters, FLOPs/token, memory traffic/token, size on disk, peak memory, latency, throughput and energy (where
    a counter is readable) of every model, measured back to back here (never one model per run: timings of different
    runs or machines do not compare). Prompts: the first questions of ``split``."""
    out = DEPLOYMENT.output(run_dir, models=models, settings=settings, template=template, data=data, split=split)
    if done := out.done:
        return done
    rows = read_split(data, split)
    prompts = [render(template, question=r["question"]) for r in rows[: settings.throughput_batch]]
    prompts += prompts[-1:] * (settings.throughput_batch - len(prompts))  # a split smaller than the batch
    figures, energy = deployment.figures(
        {name: model_location(ref) for name, ref in models.items()}, prompts, settings.latency_tokens, settings.repeats
    )
    with out.building() as tmp:
        (tmp / deployment.FIGURES).write_text(json.dumps(figures, indent=2))
        out.finish(
            tmp,
            rows=len(figures),
            figures=figures,
            machine=deployment.machine(),
            settings=settings.model_dump(exclude={"power"}),
            flops_formula=deployment.FLOPS_FORMULA,
            traffic_formula=TRAFFIC_FORMULA,
            energy=energy,
        )
    return out.ref()


def judge_identity(section: EvaluationSection.Judge) -> tuple[EvaluationSection.Judge, dict]:
    """Which model judges, by content: (the section with a local judge folder as ``sha256:<its files>``, and for an API
    judge ``{"served": <the card its server lists for the name>}``). A hub id, a folder inside a stage output, or a
    server that never said which model it serves: the section as it is and ``{}``, keyed as it always was."""
    if section.backend is not Backend.openai:
        return keyed_by_content(section), {}
    identity = served_identity(section.base_url, section.model, lambda: judge_api_key(section))
    return section, ({"served": identity} if identity else {})


# The judge's template text is in the section (a computed field), hence in the key: editing the prompt re-judges.
def judge_content(section, students, teacher, data, split) -> dict:
    keyed, served_card = judge_identity(section)
    return {"section": keyed, **served_card, "students": students, "teacher": teacher, "data": data, "split": split}


JUDGE = Stage("judge", "1", judge_content, files=(JUDGEMENTS, WIN_RATES))


def reply_folder(run_dir: Path, section: EvaluationSection.Judge, by_content: bool = True) -> Path:
    """Where this judge's replies are persisted as they arrive (``kdflow.teacher.answer_shards``), one per prompt, keyed
    by the prompt's hash: a crash, a rerun or a new student asks the judge nothing it has answered already.
    Kept after the stage (hidden, so no stage output): judge calls cost money. Named by the judge's identity
    (``judge_identity``); ``by_content=False``: by its name, where replies were kept before that."""
    keyed, served_card = judge_identity(section) if by_content else (section, {})
    judge = {
        "backend": section.backend,
        "model": keyed.model,
        "max_new_tokens": section.max_new_tokens,
        "base_url": redact_url(section.base_url),
    }  # a password in the URL is no part of what was judged
    who = content_key("judge-replies", JUDGE.version, {**judge, "vllm_args": section.vllm.extra_args, **served_card})
    return Path(run_dir) / JUDGE.name / f".replies-{who[:16]}"


def judge_api_key(section: EvaluationSection.Judge) -> str | None:
    return read_api_key(section.api_key_secret_block, section.api_key_env, "evaluation.judge.api_key_env")


@task(
    cache_policy=StageCache(JUDGE),
    **STAGE_RESULTS,
    task_run_name="judge_students[{section.backend.value} {section.model}]",
)
def judge_students(
    run_dir: Path,
    section: EvaluationSection.Judge,
    students: dict[str, OutputRef],
    teacher: OutputRef,
    data: OutputRef,
    split: str,
) -> OutputRef:
    """Each student's win rate against the teacher, by an LLM judge, on the first questions of ``split``.

    ``students`` and ``teacher``: evaluate-stage outputs; their greedy answers (``predictions.parquet``) are
    what is judged, so nothing is generated again. Each pair is judged in both orders. One output for all
    students (a local judge is started once); replies are kept by prompt (``reply_folder``), so a new student
    costs only its own judgements. Output: ``judgements.parquet`` (every judgement with the judge's raw reply,
    its verdict, the student's outcome, or the reason it has none) and ``win_rates.json`` per student."""
    out = JUDGE.output(run_dir, section=section, students=students, teacher=teacher, data=data, split=split)
    if done := out.done:
        return done
    questions, reference = read_split(data, split), predictions(teacher)
    items = {
        name: judge_prompts(
            section.template_text, judge_pairs(questions, predictions(ref), reference, section.max_questions)
        )
        for name, ref in students.items()
    }
    folder = reply_folder(run_dir, section)
    adopt_folder(reply_folder(run_dir, section, by_content=False), folder)  # replies kept before it was by identity
    judge = backend(section, lambda: judge_api_key(section))
    replies, acct = ask_judge(
        judge, section.max_new_tokens, [i["prompt"] for its in items.values() for i in its], folder
    )
    judgements = [
        {"student": name, **judgement(i, replies[prompt_id(i["prompt"])])} for name, its in items.items() for i in its
    ]
    check_judge_failures(judgements, section, folder)
    results = {name: win_rate([j for j in judgements if j["student"] == name]) for name in students}
    with out.building() as tmp:
        pd.DataFrame(judgements).to_parquet(tmp / JUDGEMENTS, index=False)
        (tmp / WIN_RATES).write_text(json.dumps(results, indent=2))
        out.finish(
            tmp,
            rows=len(judgements),
            win_rates=results,
            split=split,
            questions=len(next(iter(items.values()), [])) // 2,
            judge={
                "backend": section.backend.value,
                "model": section.model,
                "base_url": redact_url(section.base_url),
                "template": section.template,
                **{k: v for k, v in out.inputs.items() if k == "served"},
            },
            accounting=acct.as_dict(),
        )
    return out.ref()


# The harness's version is content: a new release may score differently.
LM_EVAL = Stage(
    "lm-eval",
    "1",
    lambda models, settings: {"models": models, "settings": settings, "lm_eval": importlib.metadata.version("lm_eval")},
    files=(harness.RESULTS,),
)


# Not Prefect-cached: a skip must be re-decided every run (the package or a GPU may be there next time); a run
# that happened finds its own finished output by key.
@task(cache_policy=NO_CACHE, task_run_name=lambda parameters: f"run_lm_eval[{', '.join(parameters['models'])}]")
def run_lm_eval(run_dir: Path, models: dict[str, OutputRef], settings: EvaluationSection.LmEval) -> dict:
    """``{"status": "off" | "skipped" | "done", "reason"?, "results"?: {model: {task: {metric: value}}}}``."""
    if not settings.enabled:
        return {"status": "off", "reason": "evaluation.lm_eval.enabled is false in the recipe"}
    if why := harness.unavailable():
        get_run_logger().warning(f"lm-evaluation-harness skipped: {why}")
        return {"status": "skipped", "reason": why}
    out = LM_EVAL.output(run_dir, models=models, settings=settings)
    if not (done := out.done):
        results = harness.run(
            {name: model_location(ref) for name, ref in models.items()},
            settings.tasks,
            settings.num_fewshot,
            settings.limit,
        )
        with out.building() as tmp:
            (tmp / harness.RESULTS).write_text(json.dumps(results, indent=2))
            out.finish(tmp, rows=len(results))
        done = out.ref()
    return {
        "status": "done",
        "results": json.loads((Path(done.path) / harness.RESULTS).read_text()),
        "tasks": settings.tasks,
        "limit": settings.limit,
    }
