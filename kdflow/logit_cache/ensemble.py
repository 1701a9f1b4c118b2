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


def join_caches(caches: dict[str, LogitCache], folder: Path) -> dict:
    """Routed teachers' caches (one tokenizer, disjoint rows) as one cache in ``folder``: every row exactly as its
    teacher's cache holds it, so a student reads it as it would read one teacher's. The manifest's ``teachers`` list
    says, per teacher (``name``), its rows and positions: the token share the report shows."""
    named = list(caches.items())
    first_name, first = named[0]
    for name, c in named[1:]:
        for field in ("tokenizer_sha256", "chat_template_sha256", "vocab_size", "k", "value_encoding"):
            if c.manifest[field] != first.manifest[field]:
                raise CacheMismatch(
                    f"{c.folder} (teacher {name!r}): {field} {c.manifest[field]!r} differs from teacher "
                    f"{first_name!r}'s {first.manifest[field]!r}; routed teachers' caches join only with one "
                    "tokenizer, k and value encoding"
                )
    owner: dict[str, str] = {}
    for name, c in named:
        for row_id in c.row_ids:
            if row_id in owner:
                raise ValueError(
                    f"row {row_id!r} is in teacher {owner[row_id]!r}'s cache and {name!r}'s: route each row once"
                )
            owner[row_id] = name
    teachers = [
        {**t, "name": name, "rows": c.manifest["rows"], "positions": c.manifest["positions"]}
        for name, c in named
        for t in c.manifest["teachers"]
    ]
    meta = {**first.manifest, "teachers": teachers, "source": "routed"}
    meta = {key: v for key, v in meta.items() if key not in ("rows", "positions", "bytes", "shards")}
    row_ids = [row_id for _, c in named for row_id in c.row_ids]
    shard_rows = max(
        (s["rows"] for _, c in named for s in c.manifest["shards"]), default=1
    )  # a teacher may keep no row

    def compute(indices: list[int]) -> list[TopK]:
        return [_as_topk(caches[owner[row_ids[i]]][row_ids[i]]) for i in indices]

    return capture_shards(Path(folder), row_ids, shard_rows, meta, compute)
