"""Stage: the logit cache — the teacher's top-k distributions on the kept answers, captured once so that a KD
student trains from disk without the teacher in memory (format: kdflow/logit_cache/format.py).

Rows are the curate stage's kept answers, tokenized exactly as the students' SFT sees them (prompt +
answer through the chat template) and named ``<id>/<sample>``. The shards are written into a work folder
named by the stage's key, so a crashed capture resumes from its last finished shard; when every shard is
there they are linked into the stage folder, whose manifest is written last, and the work folder goes.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from prefect import task
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger

from kdflow.config.logit_cache import LogitCacheSection
from kdflow.logit_cache.capture import capture_setup, capture_teachers
from kdflow.logit_cache.ensemble import join_caches
from kdflow.logit_cache.format import MANIFEST
from kdflow.logit_cache.parts import link_or_copy
from kdflow.logit_cache.reader import LogitCache
from kdflow.store.model_folders import keyed_by_content
from kdflow.store.outputs import OutputRef, exclusive
from kdflow.store.stage import Stage, StageOutput
from kdflow.teacher.routing import token_shares
from kdflow.teacher.vllm_server import VllmStartupError
from tasks.caching import STAGE_RESULTS, StageCache


# ``routed_to`` (one of several teachers, capturing the kept rows it answered) is in the key only where given, so that
# a recipe with one teacher keeps its key.
def ensemble_by_content(section):
    """``section`` with each ensemble member's local folder keyed by its files (new weights at the same path capture
    another cache), as a teacher folder is; the section as it is without members (every other key as it was)."""
    if not getattr(section, "ensemble", None):
        return section
    members = [keyed_by_content(m) for m in section.ensemble]
    return section.model_copy(update={"ensemble": members})


CAPTURE = Stage(
    "logit-cache",
    "1",
    lambda section, template, teacher, curated, routed_to=None: {
        "section": ensemble_by_content(section),
        "template": template,
        "teacher": teacher,
        "curated": curated,
        **({"routed_to": routed_to} if routed_to is not None else {}),
    },
    files=(MANIFEST,),
)
# Routed teachers' caches joined by row into the one cache a student reads (kdflow/logit_cache/ensemble.join_caches).
JOIN_CACHES = Stage("logit-cache-routed", "1", lambda parts: {"parts": parts}, files=(MANIFEST,))


def shard_logger():
    logger = run_logger()

    def log(index: int, entry: dict) -> None:
        logger.info(f"logit cache: shard {index} ({entry['rows']} rows, {entry['positions']} positions) done")

    return log


def _no_retry_on_startup(task, task_run, state) -> bool:
    """A vLLM server that did not start fails the same way again: no retry (a blip mid-capture is retried)."""
    return not isinstance(state.result(raise_on_failure=False), VllmStartupError)


@task(
    cache_policy=StageCache(CAPTURE),
    **STAGE_RESULTS,
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=_no_retry_on_startup,
    task_run_name="capture_logits[{section.source.value} top-{section.k}]",
)
def capture_logits(
    run_dir: Path,
    section: LogitCacheSection,
    template: str,
    teacher: OutputRef,
    curated: OutputRef,
    routed_to: str | None = None,
) -> OutputRef:
    """A retry (or a rerun after a crash) keeps every shard already written. Two runs of one key (two flow runs,
    two workers) take turns on its work folder: the second waits, then finds the output finished. ``routed_to``: of
    several teachers, this one, on the kept rows it answered."""
    out = CAPTURE.output(
        run_dir, section=section, template=template, teacher=teacher, curated=curated, routed_to=routed_to
    )
    if done := out.done:
        return done
    # Without the lock both captures wrote the same shards and sidecars, and one crashed on the other's half-written
    # files (6 of 6 races in issue 23); with it the second one's shards are the first one's, finished.
    with exclusive(run_dir, CAPTURE.name, out.key):
        if done := out.done:
            return done  # a concurrent run of the same key finished it while this one waited
        return _capture(out, section, template, teacher, curated, routed_to)


def _capture(
    out: StageOutput,
    section: LogitCacheSection,
    template: str,
    teacher: OutputRef,
    curated: OutputRef,
    routed_to: str | None = None,
) -> OutputRef:
    tokenizer, kept, rows, teachers = capture_setup(section, template, teacher, curated, routed_to)
    work, log = out.work, shard_logger()

    start = time.perf_counter()
    final, captured = capture_teachers(work, section, tokenizer, kept, rows, teachers, log)
    # Time and speed of a capture made here; a cache captured elsewhere (sharded over workers) has its
    # timings in that flow's artifact, and this task only checked it.
    seconds = time.perf_counter() - start if captured else None
    with out.building() as tmp:
        for file in sorted(final.iterdir()):
            # Linked, not moved: the work folder keeps every shard until the output is in place, so a failure
            # before the rename (a full disk at finish) retries from whole shards instead of capturing again.
            link_or_copy(file, tmp / file.name)
        manifest = LogitCache.open(tmp, expect_tokenizer=tokenizer).manifest
        out.finish(
            tmp,
            rows=manifest["rows"],
            positions=manifest["positions"],
            bytes=manifest["bytes"],
            bytes_per_position=round(manifest["bytes"] / max(manifest["positions"], 1), 2),
            k=section.k,
            source=section.source.value,
            cache_manifest=MANIFEST,
            seconds=None if seconds is None else round(seconds, 1),
            positions_per_second=None if seconds is None else round(manifest["positions"] / seconds, 1),
        )
    shutil.rmtree(work, ignore_errors=True)  # only now that the output is in place
    return out.ref()


def run_logger():
    """Prefect's run logger; a plain logger when the body runs outside a run (``capture_logits.fn``)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("kdflow.logit_cache.topk")


@task(cache_policy=StageCache(JOIN_CACHES), **STAGE_RESULTS, task_run_name="join_logit_caches")
def join_logit_caches(run_dir: Path, parts: dict[str, OutputRef]) -> OutputRef:
    """``parts``: each routed teacher's logit-cache output, by teacher name: one cache of all their rows, each row as
    its teacher's cache holds it; the manifest says each teacher's rows, positions and share of the positions."""
    out = JOIN_CACHES.output(run_dir, parts=parts)
    if done := out.done:
        return done
    caches = {name: LogitCache.open(Path(ref.path)) for name, ref in parts.items()}
    with exclusive(run_dir, JOIN_CACHES.name, out.key):
        join_caches(caches, out.work)
        with out.building() as tmp:
            for file in sorted(out.work.iterdir()):
                link_or_copy(file, tmp / file.name)
            manifest = LogitCache.open(tmp).manifest
            positions = {name: c.manifest["positions"] for name, c in caches.items()}
            out.finish(
                tmp,
                rows=manifest["rows"],
                positions=manifest["positions"],
                bytes=manifest["bytes"],
                k=manifest["k"],
                source="routed",
                cache_manifest=MANIFEST,
                by_teacher={
                    name: {"rows": c.manifest["rows"], "positions": positions[name]} for name, c in caches.items()
                },
                token_share=token_shares(positions),
            )
        shutil.rmtree(out.work, ignore_errors=True)
    return out.ref()
