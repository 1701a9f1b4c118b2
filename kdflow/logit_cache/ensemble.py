"""An ensemble of teachers as one cache: their top-k distributions averaged with weights (the source's "the teacher
may be an ensemble"), merged row by row."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdflow.config.logit_cache import ValueEncoding
from kdflow.logit_cache.format import TAIL_FLOOR, CachedRow, CacheMismatch, TopK
from kdflow.logit_cache.reader import LogitCache
from kdflow.logit_cache.writer import capture_shards


def merge_topk(members: list[TopK], weights: list[float], vocab_size: int, k: int) -> TopK:
    """One sequence's ensemble: the weighted mean of the members' probabilities, then its top-k.

    Each member's distribution is its rebuilt one (top-k, tail spread evenly over the rest), so the mean
    is a distribution; its tail is the mass outside the merged top-k. Works on the union of the members'
    ids per position, never on the full vocabulary.
    """
    first = members[0]
    for m in members[1:]:
        if m.row_id != first.row_id or m.start != first.start or not np.array_equal(m.input_ids, first.input_ids):
            raise ValueError(
                f"row {first.row_id!r}: the teachers' caches hold different sequences; merge caches "
                "captured on the same rows with the same tokenizer"
            )
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    L = len(first.ids)
    out_ids = np.zeros((L, k), dtype=np.int64)
    out_lp = np.zeros((L, k), dtype=np.float32)
    out_tail = np.zeros(L, dtype=np.float32)
    for t in range(L):
        union = np.unique(np.concatenate([m.ids[t] for m in members]))
        mean = np.zeros(len(union))
        for weight, m in zip(w, members):
            kept = np.exp(m.logprobs[t].astype(np.float64))
            tail = np.exp(float(m.tail[t]))
            norm = kept.sum() + tail
            member_k = len(m.ids[t])
            spread = tail / max(vocab_size - member_k, 1) / norm
            p = np.full(len(union), spread)
            p[np.searchsorted(union, m.ids[t])] = kept / norm
            mean += weight * p
        order = np.argsort(-mean, kind="stable")[:k]
        out_ids[t], out_lp[t] = union[order], np.log(mean[order])
        with np.errstate(divide="ignore"):
            out_tail[t] = max(np.log(max(1.0 - mean[order].sum(), 0.0)), TAIL_FLOOR)
    return TopK(first.row_id, first.input_ids, first.start, out_ids, out_lp, out_tail)


def merge_caches(
    caches: list[LogitCache],
    weights: list[float],
    folder: Path,
    k: int | None = None,
    encoding: ValueEncoding | None = None,
) -> dict:
    """Merge several teachers' caches (same rows, same tokenizer) into one cache in ``folder``, streamed."""
    base = caches[0].manifest
    for c in caches[1:]:
        for field in ("tokenizer_sha256", "chat_template_sha256", "vocab_size"):
            if c.manifest[field] != base[field]:
                raise CacheMismatch(
                    f"{c.folder}: {field} differs from {caches[0].folder}'s: an ensemble's teachers "
                    "must share one tokenizer"
                )
        if set(c.row_ids) != set(caches[0].row_ids):
            raise ValueError(
                f"{c.folder} holds other rows than {caches[0].folder}: capture every teacher on the same rows"
            )
    k = k or min(c.k for c in caches)
    encoding = encoding or caches[0].encoding
    teachers = [{**t, "weight": w} for c, w in zip(caches, weights) for t in c.manifest["teachers"]]
    meta = {**base, "teachers": teachers, "k": k, "value_encoding": encoding.value, "source": "ensemble"}
    meta = {key: v for key, v in meta.items() if key not in ("rows", "positions", "bytes", "shards")}
    row_ids = caches[0].row_ids
    shard_rows = max(s["rows"] for s in base["shards"])

    def compute(indices: list[int]) -> list[TopK]:
        return [merge_topk([_as_topk(c[row_ids[i]]) for c in caches], weights, base["vocab_size"], k) for i in indices]

    return capture_shards(Path(folder), row_ids, shard_rows, meta, compute)


def _as_topk(row: CachedRow) -> TopK:
    return TopK(row.row_id, row.input_ids.numpy(), row.start, row.ids.numpy(), row.logprobs.numpy(), row.tail.numpy())
