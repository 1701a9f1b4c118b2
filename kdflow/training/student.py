"""Training one student: its rows, its initial model, the trainer its method uses, and ``accelerate launch`` for a
student trained in processes of its own. Plain Python: the students stage (tasks/students.py) and the training
CLI (kdflow/training/cli.py, run in each launched process) both call ``train_here``."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pandas as pd
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdflow.config.fields import ROOT, redact_url
from kdflow.config.kd import FeatureKD, KDMethod, OfflineKD, OnlineKD, OnPolicyKD
from kdflow.config.precision import check_trainable_here, training_flags, weights_dtype
from kdflow.config.student import StudentData, StudentSection
from kdflow.config.teachers import Routing
from kdflow.config.templates import sft_rows
from kdflow.config.training import trainer_config
from kdflow.curation.pipeline import KEPT
from kdflow.logit_cache.format import MANIFEST as CACHE_MANIFEST
from kdflow.logit_cache.format import cache_row_id
from kdflow.logit_cache.interop import STAGE as IMPORTED
from kdflow.store.model_folders import LOG_HISTORY, model_location
from kdflow.store.outputs import OutputRef
from kdflow.store.run_folder import read_split
from kdflow.teacher.routing import TEACHER_COLUMN, RoutedTeachers, row_teachers
from kdflow.training.curves import curve_snapshots
from kdflow.training.progress import OnProgress, TrainingProgress
from kdflow.training.sft import train_sft
from kdflow.training.tiny_models import llama_model


def subset(row_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A ``fraction`` of ``row_ids`` chosen by the seed alone: the same rows for every method trained with
    this seed (so seq-KD and logit KD are compared on one transfer set), nested as the fraction grows."""
    n = max(1, round(len(row_ids) * fraction))
    rank = lambda rid: hashlib.sha256(f"{seed}:{rid}".encode()).hexdigest()
    return set(sorted(row_ids, key=rank)[:n])


def student_rows(
    section: StudentSection,
    template: str,
    data: OutputRef,
    curated: OutputRef | None,
    routing: Routing | None = None,
    logits: OutputRef | None = None,
) -> list[dict]:
    """The student's prompt-completion rows, each with its ``row_id`` (the logit cache's name for it); with
    ``routing`` (several teachers score its samples, on-policy), each with its ``teacher`` too: the one ``routing``
    sends its data row to (a gold row is a train-split row). ``logits``: the cache, where it is imported and the
    student reads it: its own rows instead (``imported_rows``)."""
    if trains_on_imported_rows(section, logits):
        return imported_rows(section, logits)
    if section.data is StudentData.gold:
        rows = [{**r, "split": "train"} for r in read_split(data, "train")]
        column = "rationale"
    elif curated is None:
        raise ValueError(f"student {section.name!r} learns from the teacher's answers; pass the curate stage's output")
    else:
        rows, column = pd.read_parquet(Path(curated.path) / KEPT).to_dict("records"), "text"  # each with its split
    out = [{**c, "row_id": cache_row_id(r)} for r, c in zip(rows, sft_rows(rows, template, column))]
    if routing is not None:  # the data rows' own columns, as generation routed them (a kept row lacks the rationale)
        teachers = row_teachers(data, sorted({r["split"] for r in rows}), routing)
        out = [{**c, TEACHER_COLUMN: teachers[r["split"], r["id"]]} for r, c in zip(rows, out)]
    if section.data_fraction < 1.0:
        keep = subset([r["row_id"] for r in out], section.data_fraction, section.seed)
        out = [r for r in out if r["row_id"] in keep]
    return out


def imported_rows(section: StudentSection, logits: OutputRef) -> list[dict]:
    """The rows of an imported cache a student trains on, by ``row_id`` (the trainer reads their tokens from the
    cache): all of them, or the ``data_fraction`` the seed picks."""
    manifest = json.loads((Path(logits.path) / CACHE_MANIFEST).read_text())
    ids = [row_id for shard in manifest["shards"] for row_id in shard["row_ids"]]
    if section.data_fraction < 1.0:
        keep = subset(ids, section.data_fraction, section.seed)
        ids = [row_id for row_id in ids if row_id in keep]
    return [{"row_id": row_id} for row_id in ids]


def init_student(section: StudentSection, teacher: OutputRef):
    """A pretrained student with its own tokenizer, or a fresh Llama sharing the teacher's tokenizer; in the
    section's ``dtype`` when set."""
    dtype = weights_dtype(section.dtype)
    if section.model:
        model = AutoModelForCausalLM.from_pretrained(section.model, **({} if dtype is None else {"dtype": dtype}))
        return model, AutoTokenizer.from_pretrained(section.model)
    tokenizer = AutoTokenizer.from_pretrained(model_location(teacher))
    a = section.architecture
    model = llama_model(tokenizer, a.hidden, a.layers, a.heads, a.intermediate, seed=section.seed)
    return (model if dtype is None else model.to(dtype)), tokenizer


def needs_curated(section: StudentSection) -> bool:
    """The student learns from the teacher's kept answers (not from gold alone)."""
    return section.data is StudentData.teacher


def needs_logit_cache(section: StudentSection) -> bool:
    """Offline KD reads the logit cache, and on-policy KD for its off-policy share (lmbda < 1); online and feature
    KD run the teacher live."""
    kd = section.kd
    return kd is not None and (kd.method is KDMethod.offline or isinstance(kd, OnPolicyKD) and kd.lmbda < 1.0)


def needs_routed_teachers(section: StudentSection) -> bool:
    """On-policy KD: with several routed teachers, each scores the student's samples of its rows during training, so
    all of them (and the routing) are the student's inputs; every other student reads their joined outputs."""
    return isinstance(section.kd, OnPolicyKD)


def trains_on_imported_rows(section: StudentSection, logits: OutputRef | None) -> bool:
    """An imported logit cache (``logit_cache: {import: ...}``) holds sequences of its own, not the teacher's answers
    by row id: a student that reads it trains on every one of them (its ``data_fraction`` of them)."""
    return logits is not None and logits.stage == IMPORTED and needs_logit_cache(section)


def cache_stage(r) -> str:
    """The stage folder a recipe ``r``'s logit cache is in: its import's, or its capture's."""
    return IMPORTED if r.logit_cache is not None and r.logit_cache.imported else "logit-cache"


def student_inputs(
    section: StudentSection, curated: OutputRef | None, logits: OutputRef | None
) -> tuple[OutputRef | None, OutputRef | None]:
    """What of the run a student trains from: the curated answers unless it learns from gold alone or from an
    imported cache's own rows, the logit cache only for offline KD — so a new filter or a new cache retrains only the
    students that use them."""
    if trains_on_imported_rows(section, logits):
        return None, logits
    return (curated if needs_curated(section) else None), (logits if needs_logit_cache(section) else None)


def check_student_tokenizer(section: StudentSection, teacher: OutputRef, tokenizer) -> None:
    """White-box KD compares distributions token by token: refuse another tokenizer before any work,
    unless the recipe asks for GOLD (cross-tokenizer)."""
    if section.kd is None:
        return  # sequence-level KD learns from text; any tokenizer will do
    if teacher.manifest().get("imported"):
        return  # only the imported cache is here: the offline trainer checks its tokenizer when it opens it
    from kdflow.training.tokenizer_compat import check_tokenizers

    cross = section.kd.cross_tokenizer if isinstance(section.kd, OnlineKD) else None  # GOLD is an online method
    check_tokenizers(AutoTokenizer.from_pretrained(model_location(teacher)), tokenizer, cross_tokenizer=cross)


def fit_student(
    model,
    tokenizer,
    section: StudentSection,
    rows: list[dict],
    teacher: OutputRef,
    logits: OutputRef | None,
    out: Path,
    checkpoints: Path,
    on_progress: OnProgress | None = None,
    routed: RoutedTeachers | None = None,
) -> list[dict]:
    """Train the student by its method, on the one config object that method's trainer takes: built here, and
    only here, from the section's ``training`` keys and its ``kd`` settings (the section stays what keys the stage).
    ``on_progress(step, total, loss, seconds_left)``: called on every logging step (progress lines naming the
    student are printed either way). ``routed``: several teachers scoring an on-policy student's samples, each row's
    by the teacher in its ``teacher`` field (``student_rows`` with the routing)."""
    kd, training = section.kd, {**section.training, **training_flags(section.dtype)}
    config = partial(trainer_config, training, out, section.seed, checkpoints)
    callbacks = [
        TrainingProgress("students", section.name, on_progress),
        *curve_snapshots(section, out, tokenizer, checkpoints),
    ]
    # LoRA: the recipe refuses it for feature KD and GOLD, so only the other trainers take it.
    peft = None
    if section.lora is not None:
        from kdflow.training.lora import lora_config

        peft = lora_config(section.lora, model)
    if routed is not None and not isinstance(kd, OnPolicyKD):
        raise ValueError(f"student {section.name!r}: only on-policy KD scores its samples by several routed teachers")
    texts = [{k: v for k, v in r.items() if k not in ("row_id", TEACHER_COLUMN)} for r in rows]  # for text trainers
    if kd is None:
        return train_sft(model, tokenizer, texts, config(), out, callbacks, peft)
    settings = kd.model_dump(exclude={"method"})  # the recipe's names are the config's
    if isinstance(kd, OfflineKD):
        from kdflow.training.offline_kd import OfflineKDConfig, train_offline_kd

        cfg = config(OfflineKDConfig, logit_cache=str(logits.path), **settings)
        return train_offline_kd(model, tokenizer, rows, cfg, out, callbacks, peft)
    if isinstance(kd, OnPolicyKD):  # the teacher scores out of process: never loaded here
        from kdflow.training.on_policy import OnPolicyConfig, train_on_policy

        cache = str(logits.path) if logits is not None else None
        cfg = config(OnPolicyConfig, teacher=str(model_location(teacher)), logit_cache=cache, **settings)
        folders, served = (routed.folders(), routed.served) if routed is not None else (None, None)
        return train_on_policy(model, tokenizer, rows, cfg, out, callbacks, peft, teachers=folders, served=served)
    dtype = weights_dtype(section.dtype)  # the live teacher runs in the student's precision
    # loaded once its method's config has passed its checks
    live = lambda: AutoModelForCausalLM.from_pretrained(
        model_location(teacher), **({} if dtype is None else {"dtype": dtype})
    ).eval()
    if isinstance(kd, FeatureKD):
        from kdflow.training.feature_kd import FeatureKDConfig, train_feature_kd

        f = kd.feature
        cfg = config(FeatureKDConfig, feature_layers=f.layers, feature_loss=f.kind, feature_weight=f.weight)
        return train_feature_kd(model, live(), tokenizer, texts, cfg, out, callbacks)
    if kd.cross_tokenizer == "gold":
        from kdflow.training.gold import GOLDConfig, train_gold

        cfg = config(
            GOLDConfig,
            use_uld_loss=True,
            teacher_tokenizer_name_or_path=str(model_location(teacher)),
            lmbda=kd.lmbda,
            temperature=kd.temperature,
            max_completion_length=kd.max_new_tokens,
        )
        return train_gold(model, live(), tokenizer, texts, cfg, out, callbacks)
    from kdflow.training.online_kd import GKDConfig, train_online

    cfg = config(GKDConfig, lmbda=kd.lmbda, beta=kd.beta, temperature=kd.temperature, max_new_tokens=kd.max_new_tokens)
    return train_online(model, live(), tokenizer, texts, cfg, out, callbacks, peft)


def train_here(
    section: StudentSection,
    rows: list[dict],
    teacher: OutputRef,
    logits: OutputRef | None,
    out: Path,
    checkpoints: Path | None,
    on_progress: OnProgress | None = None,
    routed: RoutedTeachers | None = None,
) -> None:
    """Train the student in this process into ``out``: ``model/`` (merged, for LoRA, with ``adapter/`` beside
    it) and ``log_history.json``. Each process ``accelerate launch`` starts runs this too (DDP). ``routed``: as in
    ``fit_student``."""
    check_trainable_here(section.dtype, f"student {section.name!r}")
    model, tokenizer = init_student(section, teacher)
    check_student_tokenizer(section, teacher, tokenizer)
    fit_student(model, tokenizer, section, rows, teacher, logits, out, checkpoints, on_progress, routed)


class StudentJob(BaseModel):
    """What a launched training process is handed: the section and the very inputs the stage keyed it on
    (not the newest outputs of the run folder, which a concurrent run may have replaced meanwhile)."""

    section: StudentSection
    template: str
    teacher: OutputRef
    data: OutputRef
    curated: OutputRef | None = None
    logits: OutputRef | None = None
    checkpoints: str | None = None

    def write(self, path: Path) -> None:
        # Computed fields (a template's or config's text) are derived on load, and the strict sections refuse them.
        Path(path).write_text(self.model_dump_json(exclude_computed_fields=True, indent=1))

    def secrets(self) -> dict[str, str]:
        """What the job file leaves out, for the launched processes' environment: an on-policy teacher's base URL
        with its user:password, which the file holds redacted (``https://***@host``), as every JSON dump does."""
        kd = self.section.kd
        if isinstance(kd, OnPolicyKD) and kd.base_url and redact_url(kd.base_url) != kd.base_url:
            return {TEACHER_URL_ENV: kd.base_url}
        return {}

    @classmethod
    def read(cls, path: Path) -> "StudentJob":
        """The job in ``path``, with the teacher's URL whole again when ``TEACHER_URL_ENV`` holds the URL that the
        file holds redacted: a launched on-policy student was handed ``https://***@host`` and could not reach it."""
        job = cls.model_validate_json(Path(path).read_text())
        kd, url = job.section.kd, os.environ.get(TEACHER_URL_ENV)
        if isinstance(kd, OnPolicyKD) and url and kd.base_url == redact_url(url):
            job.section = job.section.model_copy(update={"kd": kd.model_copy(update={"base_url": url})})
        return job


LOG_TAIL = 40  # lines of a failed launch's log quoted in the error
TEACHER_URL_ENV = "KDFLOW_TEACHER_BASE_URL"  # an on-policy teacher's URL with credentials, for launched processes


def launch_student(job: StudentJob, out: Path, job_file: Path, log: Path) -> None:
    """Train ``job`` into ``out`` by ``accelerate launch`` with the section's config, each process running
    ``kdflow.training.cli``. The launcher's output (every rank's) goes to ``log``; a non-zero exit
    raises with its last lines."""
    launch = job.section.launch
    job.write(job_file)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(launch.config_path),
        *(["--num_processes", str(launch.num_processes)] if launch.num_processes else []),
        "-m",
        "kdflow.training.cli",
        "--job",
        str(job_file),
        "--out",
        str(out),
    ]
    # The processes import kdflow from this checkout, whatever the caller's working directory.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **job.secrets(),
    }
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(Path(log).read_text(errors="replace").splitlines()[-LOG_TAIL:])
        raise RuntimeError(
            f"student {job.section.name!r}: `accelerate launch` exited with {code}; the last lines of {log}:\n{tail}"
        )
    if not (Path(out) / "model" / "config.json").is_file():
        raise RuntimeError(
            f"student {job.section.name!r}: `accelerate launch` exited with 0 but wrote no model to {out}; see {log}"
        )
    job_file.unlink(missing_ok=True)


def saved_params(model_dir: Path) -> int:
    """Parameters of a saved model, from its safetensors headers (no weights loaded; tied ones saved once)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def on_policy_accounting(out: Path) -> dict:
    """An on-policy student's accounting for its manifest (``on_policy``: tokens sampled and scored, seconds
    sampling / scoring / training), read from the file its trainer wrote; {} for any other student."""
    import json

    from kdflow.training.on_policy import ACCOUNTING_FILE

    path = Path(out) / ACCOUNTING_FILE
    return {"on_policy": json.loads(path.read_text())} if path.is_file() else {}


def topk_summary(out: Path, section: StudentSection) -> dict:
    """A top-k KD student's diagnostics for its manifest (``topk``: the teacher's kept and tail mass, the share of
    positions whose student top-1 lies outside the teacher's top-k, the KD and CE terms and their ratio; mean over
    training, first and last logging window), from the log history its trainer wrote; {} for any other student."""
    import json

    from kdflow.training.topk_diagnostics import summary

    path = Path(out) / LOG_HISTORY
    kd = section.kd
    alpha = 0.0 if isinstance(kd, OnPolicyKD) else getattr(kd, "alpha", None)  # on-policy: the divergence alone
    topk = summary(json.loads(path.read_text()), alpha) if path.is_file() else {}
    return {"topk": topk} if topk else {}
