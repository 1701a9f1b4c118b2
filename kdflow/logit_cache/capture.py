"""Capturing the teacher's top-k distributions into a logit cache, without Prefect: the kept rows encoded as the
students' SFT sees them, and one teacher's cache captured from an HF model, a vLLM server (teacher-forced
prompt_logprobs) or the logprobs an API returned with the answers (``source: api``).

A capture writes whole shards into its folder (``format.capture_shards``), so a crashed capture resumes from its
last finished shard; a folder that already holds the whole cache is checked, not captured again.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from kdflow.config.fields import redact_url
from kdflow.config.logit_cache import CaptureSource, LogitCacheSection
from kdflow.config.templates import sft_rows
from kdflow.curation.pipeline import KEPT
from kdflow.logit_cache import topk
from kdflow.logit_cache.ensemble import merge_caches
from kdflow.logit_cache.format import CorruptShard, TopK, cache_meta, cache_row_id
from kdflow.logit_cache.parts import COUNTS
from kdflow.logit_cache.reader import LogitCache

# The scoring server's flags live with the scorer (on-policy starts one too); capture reads them from there.
from kdflow.logit_cache.scoring import TeacherScoringError, prompt_logprobs_args, served_dtype  # noqa: F401
from kdflow.logit_cache.writer import capture_shards
from kdflow.store.model_folders import model_location
from kdflow.store.outputs import OutputRef, hash_folder
from kdflow.teacher.routing import TEACHER_COLUMN


def encoded_rows(kept: list[dict], template: str, tokenizer) -> list[topk.EncodedRow]:
    chats = sft_rows(kept, template, "text")
    return [topk.encode_row(tokenizer, cache_row_id(r), c["prompt"], c["completion"]) for r, c in zip(kept, chats)]


def api_records(row: dict) -> list[dict]:
    """The generate stage's per-token logprob columns -> records for ``topk.topk_from_api_records``."""
    if row.get("token_ids") is None or row.get("top_ids") is None:
        raise ValueError(
            f"row {cache_row_id(row)!r} has no token ids with its top_logprobs: generate with "
            "generation.logprobs set and token ids returned (return_tokens_as_token_ids)"
        )
    return [
        {"token_id": t, "logprob": lp, "top": list(zip(ids, lps))}
        for t, lp, ids, lps in zip(row["token_ids"], row["token_logprobs"], row["top_ids"], row["top_logprobs"])
    ]


def capture_hf(folder: Path, model_dir: str, rows, section: LogitCacheSection, meta: dict, log) -> dict:
    from kdflow.teacher.hf_generate import load

    model, tokenizer = load(model_dir, section.dtype)  # runs in that dtype; top-k log-probs in float32
    return capture_shards(
        folder,
        [r.row_id for r in rows],
        section.shard_rows,
        meta,
        lambda idx: topk.hf_topk(
            model,
            [rows[i] for i in idx],
            section.k,
            section.temperature,
            section.batch_tokens,
            tokenizer.pad_token_id or 0,
        ),
        log,
    )


def capture_vllm(folder: Path, model_dir: str, rows, section: LogitCacheSection, meta: dict, log) -> dict:
    import openai

    from kdflow.teacher.vllm_server import vllm_server

    def run(base_url: str) -> dict:
        # A timeout per try: the client's default (600 s, times 6 tries) is ours too, but written down and a recipe
        # field, so that a server that accepts and never replies fails the capture in a time the recipe chose.
        client = openai.OpenAI(
            base_url=base_url, api_key=os.environ.get("VLLM_API_KEY", "EMPTY"), max_retries=5, timeout=section.timeout_s
        )

        def compute(idx: list[int]) -> list[TopK]:
            try:
                return topk.vllm_topk(client, model_dir, [rows[i] for i in idx], section.k, section.concurrency)
            except openai.APITimeoutError as e:
                raise TeacherScoringError(
                    f"the teacher's vLLM server at {redact_url(base_url)} gave no answer within "
                    f"{section.timeout_s:g} s on any of {client.max_retries + 1} tries while "
                    f"capturing rows {idx[0]} to {idx[-1]} (raise logit_cache.timeout_s if it "
                    "is only slow)"
                ) from e

        return capture_shards(folder, [r.row_id for r in rows], section.shard_rows, meta, compute, log)

    if section.base_url:
        return run(section.base_url)
    with vllm_server(model_dir, extra_args=vllm_capture_args(section, model_dir)) as url:
        return run(url)


def vllm_capture_args(section: LogitCacheSection, model_dir: str) -> list[str]:
    """The capture server's flags (``prompt_logprobs_args``) at the section's dtype, else the model's own: vLLM's
    "auto" would run a float32 teacher in 16 bits, and the cache would not be its logits."""
    dtype = section.dtype.value if section.dtype is not None else served_dtype(model_dir)
    return prompt_logprobs_args(section.k, dtype)


def capture_api(folder: Path, kept: list[dict], rows, section: LogitCacheSection, meta: dict, log) -> dict:
    return capture_shards(
        folder,
        [r.row_id for r in rows],
        section.shard_rows,
        meta,
        lambda idx: [topk.topk_from_api_records(rows[i], api_records(kept[i]), section.k) for i in idx],
        log,
    )


def capture_setup(
    section: LogitCacheSection, template: str, teacher: OutputRef, curated: OutputRef, routed_to: str | None = None
):
    """The teacher's tokenizer, the kept rows and their encodings, and each teacher's (model, cache meta, weight).
    ``routed_to``: of several teachers, this one: only the kept rows it answered (their ``teacher`` column)."""
    from transformers import AutoTokenizer

    model_dir = model_location(teacher)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kept = pd.read_parquet(Path(curated.path) / KEPT).to_dict("records")
    if routed_to is not None:
        kept = [r for r in kept if r.get(TEACHER_COLUMN) == routed_to]
    rows = encoded_rows(kept, template, tokenizer)
    vocab = _vocab_size(model_dir)
    members = [(model_dir, teacher.sha256, section.teacher_weight)]
    members += [(m.model, hash_folder(Path(m.model)), m.weight) for m in section.ensemble]
    teachers = [
        (
            str(location),
            cache_meta(
                teachers=[{"model": str(location), "revision": revision, "weight": weight}],
                tokenizer=tokenizer,
                vocab_size=vocab,
                k=section.k,
                temperature=section.temperature,
                encoding=section.value_encoding,
                source=section.source.value,
            ),
            weight,
        )
        for location, revision, weight in members
    ]
    return tokenizer, kept, rows, teachers


def capture_member(
    folder: Path, section: LogitCacheSection, location: str, kept: list[dict], rows, meta: dict, log
) -> bool:
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


def capture_teachers(
    work: Path, section: LogitCacheSection, tokenizer, kept: list[dict], rows, teachers, log
) -> tuple[Path, bool]:
    """Each teacher's cache in ``work/teacher-<j>``, and their ensemble in ``work/ensemble`` when there are several.
    Returns the final cache's folder, and whether anything was captured here (False: every cache was whole)."""
    parts = [work / f"teacher-{j}" for j in range(len(teachers))]
    captured = [
        capture_member(folder, section, location, kept, rows, meta, log)
        for folder, (location, meta, _) in zip(parts, teachers)
    ]
    if len(parts) == 1:
        return parts[0], any(captured)
    caches = [LogitCache.open(p, expect_tokenizer=tokenizer) for p in parts]
    merge_caches(caches, [w for *_, w in teachers], work / "ensemble", k=section.k)
    return work / "ensemble", any(captured)


def _finished(folder: Path, meta: dict) -> bool:
    try:
        cache = LogitCache.open(folder)
        cache.verify()
    except (FileNotFoundError, CorruptShard):
        return False  # capture_shards keeps the shards that are whole and redoes the rest
    return {k: v for k, v in cache.manifest.items() if k not in COUNTS} == meta


def _vocab_size(model_dir: str) -> int:
    """The teacher's logits per position (its config's vocab_size, which may exceed the tokenizer's)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).vocab_size
