"""Stage 4: students, trained with TRL: the baseline on gold rationales, seq-KD on the teacher's kept answers
(which also cover questions the gold set does not), and white-box KD students on the same answers — from
the logit cache (offline), with the live teacher (online GKD), or on its hidden states (feature KD).

Training checkpoints go to a work folder named by the stage's key, outside the temporary output folder, so
a rerun after a crash or a kill resumes from the last checkpoint instead of starting over."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pandas as pd
from prefect import task
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdflow.models import model_location, write_location
from kdflow.outputs import OutputRef, building, exclusive, existing_output, finish
from kdflow.recipe import KDMethod, StudentData, StudentSection
from kdflow.sft import train_sft
from kdflow.tiny_models import count_params, llama_model
from tasks.capture import cache_row_id
from tasks.caching import StageCache, stage_key
from tasks.data import read_split
from tasks.teacher import sft_rows

STAGE, VERSION = "students", "1"


def subset(row_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A ``fraction`` of ``row_ids`` chosen by the seed alone: the same rows for every method trained with
    this seed (so seq-KD and logit KD are compared on one transfer set), nested as the fraction grows."""
    n = max(1, round(len(row_ids) * fraction))
    rank = lambda rid: hashlib.sha256(f"{seed}:{rid}".encode()).hexdigest()
    return set(sorted(row_ids, key=rank)[:n])


def student_rows(section: StudentSection, template: str, data: OutputRef, curated: OutputRef | None) -> list[dict]:
    """The student's prompt-completion rows, each with its ``row_id`` (the logit cache's name for it)."""
    if section.data is StudentData.gold:
        rows = read_split(data, "train")
        rows = [{**c, "row_id": cache_row_id(r)} for r, c in zip(rows, sft_rows(rows, template, "rationale"))]
    elif curated is None:
        raise ValueError(f"student {section.name!r} learns from the teacher's answers; pass the curate stage's output")
    else:
        kept = pd.read_parquet(Path(curated.path) / "kept.parquet").to_dict("records")
        rows = [{**c, "row_id": cache_row_id(r)} for r, c in zip(kept, sft_rows(kept, template, "text"))]
    if section.data_fraction < 1.0:
        keep = subset([r["row_id"] for r in rows], section.data_fraction, section.seed)
        rows = [r for r in rows if r["row_id"] in keep]
    return rows


def init_student(section: StudentSection, teacher: OutputRef):
    """A pretrained student with its own tokenizer, or a fresh Llama sharing the teacher's tokenizer."""
    if section.model:
        return AutoModelForCausalLM.from_pretrained(section.model), AutoTokenizer.from_pretrained(section.model)
    tokenizer = AutoTokenizer.from_pretrained(model_location(teacher))
    a = section.architecture
    return llama_model(tokenizer, a.hidden, a.layers, a.heads, a.intermediate, seed=section.seed), tokenizer


def student_inputs(section: StudentSection, curated: OutputRef | None,
                   logits: OutputRef | None) -> tuple[OutputRef | None, OutputRef | None]:
    """What of the run a student trains from: the curated answers unless it learns from gold alone, the logit
    cache only for offline KD — so a new filter or a new cache retrains only the students that use them."""
    offline = section.kd is not None and section.kd.method is KDMethod.offline
    return (curated if section.data is StudentData.teacher else None), (logits if offline else None)


def check_student_tokenizer(section: StudentSection, teacher: OutputRef, tokenizer) -> None:
    """White-box KD compares distributions token by token: refuse another tokenizer before any work,
    unless the recipe asks for GOLD (cross-tokenizer)."""
    if section.kd is None:
        return  # sequence-level KD learns from text; any tokenizer will do
    from kdflow.tokenizer_compat import check_tokenizers

    check_tokenizers(AutoTokenizer.from_pretrained(model_location(teacher)), tokenizer,
                     cross_tokenizer=section.kd.cross_tokenizer)


def fit_student(model, tokenizer, section: StudentSection, rows: list[dict], teacher: OutputRef,
                logits: OutputRef | None, out: Path, checkpoints: Path) -> list[dict]:
    kd, training, seed = section.kd, section.training, section.seed
    row_ids = [r["row_id"] for r in rows]
    rows = [{k: v for k, v in r.items() if k != "row_id"} for r in rows]
    if kd is None:
        return train_sft(model, tokenizer, rows, training, out, seed, checkpoints)
    if kd.method is KDMethod.offline:
        from kdflow.kd_trainer import KDLoss, train_offline_kd

        return train_offline_kd(model, tokenizer, logits.path, KDLoss.of(kd), training, out, seed, checkpoints,
                                row_ids=row_ids)
    live = AutoModelForCausalLM.from_pretrained(model_location(teacher)).eval()
    if kd.cross_tokenizer == "gold":
        from kdflow.tokenizer_compat import train_gold

        return train_gold(model, live, tokenizer, AutoTokenizer.from_pretrained(model_location(teacher)), rows,
                          training, out, seed, lmbda=kd.lmbda, temperature=kd.temperature,
                          max_new_tokens=kd.max_new_tokens, checkpoints=checkpoints)
    if kd.method is KDMethod.online:
        from kdflow.online_kd import train_online

        return train_online(model, live, tokenizer, rows, training, out, seed, lmbda=kd.lmbda, beta=kd.beta,
                            temperature=kd.temperature, max_new_tokens=kd.max_new_tokens, checkpoints=checkpoints)
    from kdflow.feature_kd import train_feature_kd

    return train_feature_kd(model, live, tokenizer, rows, training, out, seed, layer_map=kd.feature.layers,
                            kind=kd.feature.kind, weight=kd.feature.weight, checkpoints=checkpoints)


@task(cache_policy=StageCache(STAGE, VERSION), persist_result=True)
def train_student(run_dir: Path, section: StudentSection, template: str, teacher: OutputRef, data: OutputRef,
                  curated: OutputRef | None, logits: OutputRef | None = None) -> OutputRef:
    """``curated`` is None for a gold-only student, so that a new filter does not retrain the baseline;
    ``logits`` (the logit cache) is passed to offline-KD students only."""
    inputs = {"section": section, "template": template, "teacher": teacher, "data": data, "curated": curated,
              "logits": logits}
    key = stage_key(STAGE, VERSION, inputs)
    if done := existing_output(run_dir, STAGE, key):
        return done
    if section.kd is not None and section.kd.method is KDMethod.offline and logits is None:
        raise ValueError(f"student {section.name!r} trains from the logit cache: pass the logit-cache stage's output")
    rows = student_rows(section, template, data, curated)
    if not rows:
        raise ValueError(f"student {section.name!r} has no training rows: the filter kept no teacher answers")
    model, tokenizer = init_student(section, teacher)
    check_student_tokenizer(section, teacher, tokenizer)
    checkpoints = Path(run_dir) / STAGE / f".work-{key[:16]}"
    with exclusive(run_dir, STAGE, key):
        if done := existing_output(run_dir, STAGE, key):
            return done  # a concurrent run of the same student finished it while this one waited
        with building(run_dir, STAGE, key) as tmp:
            start = time.perf_counter()
            fit_student(model, tokenizer, section, rows, teacher, logits, tmp, checkpoints)
            write_location(tmp, "model")
            finish(tmp, STAGE, key, inputs=inputs, rows=len(rows), name=section.name, params=count_params(model),
                   seconds=round(time.perf_counter() - start, 1))
    return existing_output(run_dir, STAGE, key)
