"""Stage: the logit cache — the teacher's top-k distributions on the kept answers, captured once so that a KD
student trains from disk without the teacher in memory (format: kdflow/logit_cache/format.py).

Rows are the curate stage's kept answers, tokenized exactly as the students' SFT sees them (prompt +
answer through the chat template) and named ``<id>/<sample>``. The shards are written into a work folder
named by the stage's key, so a crashed capture resumes from its last finished shard; when every shard is
there they are linked into the stage folder, whose manifest is written last, and the work folder goes.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger

from kdflow.logit_cache import topk as capture
from kdflow.logit_cache.parts import COUNTS, link_or_copy
from kdflow.config.templates import sft_rows
from kdflow.logit_cache.format import (MANIFEST, CorruptShard, LogitCache, cache_meta, cache_row_id, capture_shards,
                                      merge_caches)
from kdflow.store.model_folders import model_location
from kdflow.store.outputs import OutputRef, hash_folder
from kdflow.store.stage import Stage
from kdflow.config.logit_cache import CaptureSource, LogitCacheSection
from tasks.caching import STAGE_RESULTS, StageCache

CAPTURE = Stage("logit-cache", "1", lambda section, template, teacher, curated: {
    "section": section, "template": template, "teacher": teacher, "curated": curated})


def encoded_rows(kept: list[dict], template: str, tokenizer) -> list[capture.EncodedRow]:
    chats = sft_rows(kept, template, "text")
    return [capture.encode_row(tokenizer, cache_row_id(r), c["prompt"], c["completion"]) for r, c in zip(kept, chats)]


def api_records(row: dict) -> list[dict]:
    """The generate stage's per-token logprob columns -> records for ``capture.topk_from_api_records``."""
    if row.get("token_ids") is None or row.get("top_ids") is None:
        raise ValueError(f"row {cache_row_id(row)!r} has no token ids with its top_logprobs: generate with "
                         "generation.logprobs set and token ids returned (return_tokens_as_token_ids)")
    return [{"token_id": t, "logprob": lp, "top": list(zip(ids, lps))}
            for t, lp, ids, lps in zip(row["token_ids"], row["token_logprobs"], row["top_ids"], row["top_logprobs"])]


def capture_hf(folder: Path, model_dir: str, rows, section: LogitCacheSection, meta: dict, log) -> dict:
    from kdflow.teacher.hf_generate import load

    model, tokenizer = load(model_dir)
    return capture_shards(folder, [r.row_id for r in rows], section.shard_rows, meta,
                          lambda idx: capture.hf_topk(model, [rows[i] for i in idx], section.k, section.temperature,
                                                      section.batch_tokens, tokenizer.pad_token_id or 0), log)


def capture_vllm(folder: Path, model_dir: str, rows, section: LogitCacheSection, meta: dict, log) -> dict:
    import openai

    from kdflow.teacher.vllm_server import vllm_server

    def run(base_url: str) -> dict:
        client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("VLLM_API_KEY", "EMPTY"), max_retries=5)
        return capture_shards(folder, [r.row_id for r in rows], section.shard_rows, meta,
                              lambda idx: capture.vllm_topk(client, model_dir, [rows[i] for i in idx], section.k,
                                                            section.concurrency), log)

    if section.base_url:
        return run(section.base_url)
    # Prefix caching off: a cached prefix would skip the positions whose prompt_logprobs we need. The model's
    # own dtype: vLLM's "auto" would run a float32 teacher in 16 bits, and the cache would not be its logits.
    args = ["--no-enable-prefix-caching", "--max-logprobs", str(section.k), "--dtype", _dtype(model_dir)]
    with vllm_server(model_dir, extra_args=args) as url:
        return run(url)


def _dtype(model_dir: str) -> str:
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "auto"


def capture_api(folder: Path, kept: list[dict], rows, section: LogitCacheSection, meta: dict, log) -> dict:
    return capture_shards(folder, [r.row_id for r in rows], section.shard_rows, meta,
                          lambda idx: [capture.topk_from_api_records(rows[i], api_records(kept[i]), section.k)
                                       for i in idx], log)


def capture_setup(section: LogitCacheSection, template: str, teacher: OutputRef, curated: OutputRef):
    """The teacher's tokenizer, the kept rows and their encodings, and each teacher's (model, cache meta, weight)."""
    from transformers import AutoTokenizer

    model_dir = model_location(teacher)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kept = pd.read_parquet(Path(curated.path) / "kept.parquet").to_dict("records")
    rows = encoded_rows(kept, template, tokenizer)
    vocab = _vocab_size(model_dir)
    members = [(model_dir, teacher.sha256, section.teacher_weight)]
    members += [(m.model, hash_folder(Path(m.model)), m.weight) for m in section.ensemble]
    teachers = [(str(location), cache_meta(teachers=[{"model": str(location), "revision": revision, "weight": weight}],
                                           tokenizer=tokenizer, vocab_size=vocab, k=section.k,
                                           temperature=section.temperature, encoding=section.value_encoding,
                                           source=section.source.value), weight)
                for location, revision, weight in members]
    return tokenizer, kept, rows, teachers


def capture_member(folder: Path, section: LogitCacheSection, location: str, kept: list[dict], rows, meta: dict,
                   log) -> bool:
    """Capture one teacher's cache of ``rows`` in ``folder``; False when it was there already, whole.

    A finished cache (a crashed run's, or joined from workers' parts by flows/capture_sharded.py) is checked,
    not captured again: loading a real teacher, or starting its vLLM server, only to find every shard done
    costs minutes.
    """
    if _finished(folder, meta):
        return False
    if section.source is CaptureSource.hf:
        capture_hf(folder, location, rows, section, meta, log)
    elif section.source is CaptureSource.vllm:
        capture_vllm(folder, location, rows, section, meta, log)
    else:
        capture_api(folder, kept, rows, section, meta, log)
    return True


def _finished(folder: Path, meta: dict) -> bool:
    try:
        cache = LogitCache.open(folder)
        cache.verify()
    except (FileNotFoundError, CorruptShard):
        return False  # capture_shards keeps the shards that are whole and redoes the rest
    return {k: v for k, v in cache.manifest.items() if k not in COUNTS} == meta


def shard_logger():
    logger = run_logger()

    def log(index: int, entry: dict) -> None:
        logger.info(f"logit cache: shard {index} ({entry['rows']} rows, {entry['positions']} positions) done")

    return log


@task(cache_policy=StageCache(CAPTURE), **STAGE_RESULTS, retries=1, retry_delay_seconds=10,
      task_run_name="capture_logits[{section.source.value} top-{section.k}]")
def capture_logits(run_dir: Path, section: LogitCacheSection, template: str, teacher: OutputRef,
                   curated: OutputRef) -> OutputRef:
    """A retry (or a rerun after a crash) keeps every shard already written."""
    out = CAPTURE.output(run_dir, section=section, template=template, teacher=teacher, curated=curated)
    if out.done:
        return out.done
    tokenizer, kept, rows, teachers = capture_setup(section, template, teacher, curated)
    work, log = out.work, shard_logger()

    start = time.perf_counter()
    parts = [work / f"teacher-{j}" for j in range(len(teachers))]
    captured = [capture_member(folder, section, location, kept, rows, meta, log)
                for folder, (location, meta, _) in zip(parts, teachers)]
    if len(parts) > 1:
        caches = [LogitCache.open(p, expect_tokenizer=tokenizer) for p in parts]
        merge_caches(caches, [w for *_, w in teachers], work / "ensemble", k=section.k)
        parts.append(work / "ensemble")
    # Time and speed of a capture made here; a cache captured elsewhere (sharded over workers) has its
    # timings in that flow's artifact, and this task only checked it.
    seconds = time.perf_counter() - start if any(captured) else None
    with out.building() as tmp:
        final = parts[-1]
        for file in sorted(final.iterdir()):
            # Linked, not moved: the work folder keeps every shard until the output is in place, so a failure
            # before the rename (a full disk at finish) retries from whole shards instead of capturing again.
            link_or_copy(file, tmp / file.name)
        manifest = LogitCache.open(tmp, expect_tokenizer=tokenizer).manifest
        out.finish(tmp, rows=manifest["rows"], positions=manifest["positions"],
               bytes=manifest["bytes"], bytes_per_position=round(manifest["bytes"] / max(manifest["positions"], 1), 2),
               k=section.k, source=section.source.value, cache_manifest=MANIFEST,
               seconds=None if seconds is None else round(seconds, 1),
               positions_per_second=None if seconds is None else round(manifest["positions"] / seconds, 1))
    shutil.rmtree(work, ignore_errors=True)  # only now that the output is in place
    return out.ref()


def run_logger():
    """Prefect's run logger; a plain logger when the body runs outside a run (``capture_logits.fn``)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("kdflow.logit_cache.topk")


def _vocab_size(model_dir: str) -> int:
    """The teacher's logits per position (its config's vocab_size, which may exceed the tokenizer's)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).vocab_size
