"""A white-box logit cache: the teacher's top-k next-token distributions, stored once, read by row id.

Layout of a cache folder::

    cache.json               the cache manifest (written last): teacher(s), tokenizer / template hashes,
                             vocab size, k, capture temperature, encodings, and per shard its row ids,
                             position count, byte size and sha256
    shard-00000.parquet      one row per training sequence, zstd, small row groups (random access)

One parquet row holds a whole training sequence (``row_id``): its token ids (``input_ids``, exactly what
the student trains on: prompt + kept answer through the chat template), the index ``start`` of the first
stored position, and for every stored position ``t = start, start+1, …, len(input_ids) − 2`` — the
positions whose next token is an answer token — the teacher's top-k token ids, their log-probs (sorted,
best first) and the log of the remaining tail mass. ``positions[j] = start + j`` indexes the *logits*
(HF convention: ``logits[:, t]`` predicts ``input_ids[:, t + 1]``).

Encodings (measured in ``benchmarks/logit_cache_bytes.py``):

- ids: each shard keeps a table of its distinct top-k ids, most frequent first (in the parquet file's
  metadata, ids of the smallest width that holds the vocabulary: 1 byte up to 256 tokens, 2 up to 65,536,
  3 up to 16.7M — a 152k Qwen vocabulary — else 4), and stores ranks in that table (1–2 bytes), as byte
  planes: the common candidates get small ranks whatever the vocabulary's size or order;
- log-probs: ``ValueEncoding.fp16``, or ``ValueEncoding.u8``: ``round(−log p · 12)`` clipped to 0..255
  (steps of 1/12 nat, floor at −21.25 nats, p ≈ 6e-10; error ≤ 1/24 nat, i.e. ≤ 4.2 % of each p),
  stored as differences along the top-k;
- tail: ``log(1 − Σ top-k p)`` as float16, floored at ``TAIL_FLOOR`` (−30 nats: never exactly zero).

Tail policy (how a distribution is rebuilt from the cache): the top-k get ``exp(logprob)``, the tail
mass is spread evenly over the ``V − k`` other ids, and the whole is renormalised to sum 1 (quantised
values do not sum exactly to 1). ``rebuild_logprobs`` builds the dense ``(L, V)`` version for tests and
benchmarks; a trainer should use ``sparse_target`` (``(L, k + 1)``: the top-k plus one tail bucket) and
never densify.

Safety: ``LogitCache.open(path, expect_tokenizer=tok)`` refuses a cache made with another tokenizer,
vocabulary or chat template, saying which; every shard's sha256 is checked the first time it is read
(streamed, so a check costs no memory), and a corrupt or truncated shard raises ``CorruptShard``.
Rows are found by ``row_id`` only — never by step or batch position — so shuffling and epochs are safe.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdflow.config.logit_cache import ValueEncoding
from kdflow.models.tokenizer_identity import tokenizer_fingerprint

FORMAT, FORMAT_VERSION = "kdflow-logit-cache", 1
MANIFEST = "cache.json"
CAPTURE_SETTINGS = "capture.json"  # the settings of a capture in progress: a resume must not mix two
ROW_GROUP_ROWS = 32  # random access reads one row group: small enough to be cheap, big enough to compress
U8_STEPS_PER_NAT = 12
# A tail is never stored as zero mass: the rebuilt distribution would give the other V − k tokens
# probability 0 where the teacher's is merely tiny, and KL(teacher ‖ cache) would be infinite. e^-30 ≈ 1e-13.
TAIL_FLOOR = -30.0
# Random access keeps the row groups it has read, still encoded (~2-3 bytes per cached logit), up to this many
# bytes: a shuffled epoch over a cache that fits then reads each group from disk once, and one that does not
# costs a parquet read per row (~1 ms, more than a tiny student's step) with memory still bounded.
READ_BUDGET_BYTES = 256 * 2**20
OPEN_SHARDS = 32  # shard files a reader keeps open (opening one re-reads its footer and id table)

ID_TABLE, LOCAL_ID_BYTES = b"kdflow.id_table", b"kdflow.local_id_bytes"  # per shard, in the parquet metadata
SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("start", pa.int32()),
        ("input_ids", pa.binary()),
        ("ids", pa.binary()),
        ("values", pa.binary()),
        ("tail", pa.binary()),
    ]
)


class CacheMismatch(ValueError):
    """The cache was made for another tokenizer, vocabulary or chat template than the student's."""


class CorruptShard(ValueError):
    """A shard's bytes do not match the checksum recorded when it was written."""


@dataclass
class TopK:
    """One sequence's teacher distributions.

    ``input_ids``: (n,) the full token sequence; ``start``: the first stored logit position;
    ``ids``: (L, k) int64 and ``logprobs``: (L, k) float32, best first; ``tail``: (L,) float32,
    ``log(1 − Σ exp(logprobs))``. ``L = n − 1 − start`` (every completion position), or fewer when the
    source gave fewer (an API that does not return the end-of-turn token: then the last one is missing).
    """

    row_id: str
    input_ids: np.ndarray
    start: int
    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray

    @property
    def positions(self) -> np.ndarray:
        return np.arange(self.start, self.start + len(self.ids))


@dataclass
class CachedRow:
    """What a data collator gets for one row id (torch tensors, shapes as in ``TopK``)."""

    row_id: str
    input_ids: torch.Tensor
    start: int
    positions: torch.Tensor
    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor


# ---- fingerprints -------------------------------------------------------------------------------------


def id_bytes_for(vocab_size: int) -> int:
    for width in (1, 2, 3):
        if vocab_size <= 1 << (8 * width):
            return width
    return 4


# ---- encoding -----------------------------------------------------------------------------------------


def encode_ids(ids: np.ndarray, width: int) -> bytes:
    """(…) non-negative ints -> ``width`` byte planes (all low bytes, then all next bytes, …): the high
    planes are mostly alike (ids of a 152k vocabulary never exceed 0x02 in their third byte), which zstd
    then packs to a fraction of a byte per id."""
    flat = np.ascontiguousarray(np.ravel(ids), dtype="<u4").view(np.uint8).reshape(-1, 4)
    return np.ascontiguousarray(flat[:, :width].T).tobytes()


def decode_ids(blob: bytes, width: int, k: int) -> np.ndarray:
    """Bytes from ``encode_ids`` -> (L, k) int64."""
    planes = np.frombuffer(blob, dtype=np.uint8).reshape(width, -1)
    padded = np.zeros((planes.shape[1], 4), dtype=np.uint8)
    padded[:, :width] = planes.T
    return padded.view("<u4").reshape(-1, k).astype(np.int64)


def encode_values(logprobs: np.ndarray, encoding: ValueEncoding) -> bytes:
    """(L, k) log-probs -> bytes. u8 stores each position's steps as differences from the previous entry
    (mod 256, so exact in any order): best-first values make small, repetitive differences that zstd packs
    to about half a byte each."""
    if encoding is ValueEncoding.fp16:
        return np.asarray(logprobs, dtype="<f2").tobytes()
    q = np.clip(np.rint(-np.asarray(logprobs, dtype=np.float64) * U8_STEPS_PER_NAT), 0, 255).astype(np.uint8)
    return np.diff(q, axis=-1, prepend=np.zeros_like(q[..., :1])).tobytes()  # uint8: wraps mod 256


def decode_values(blob: bytes, encoding: ValueEncoding, k: int) -> np.ndarray:
    """-> (L, k) float32 log-probs."""
    if encoding is ValueEncoding.fp16:
        return np.frombuffer(blob, dtype="<f2").reshape(-1, k).astype(np.float32)
    q = np.cumsum(np.frombuffer(blob, dtype=np.uint8).reshape(-1, k), axis=-1, dtype=np.uint8)  # mod 256
    return q.astype(np.float32) / -U8_STEPS_PER_NAT


def tail_from_topk(logprobs: np.ndarray) -> np.ndarray:
    """``log(1 − Σ exp(logprobs))`` over the last axis, for sources that give only the top-k (vLLM, APIs),
    floored at ``TAIL_FLOOR`` (rounding can push the sum to 1 or a hair above)."""
    total = np.exp(np.asarray(logprobs, dtype=np.float64)).sum(-1)
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(np.clip(1.0 - total, 0.0, None)), TAIL_FLOOR).astype(np.float32)


# ---- rebuilding distributions -------------------------------------------------------------------------


def sparse_target(logprobs: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """The cached distribution as k + 1 classes (top-k, then the tail bucket), renormalised.

    ``logprobs``: (..., k), ``tail``: (...) -> (..., k + 1) log-probs that sum (in prob space) to 1.
    """
    joint = torch.cat([logprobs.float(), tail.float().unsqueeze(-1)], dim=-1)
    return joint - torch.logsumexp(joint, dim=-1, keepdim=True)


def rebuild_logprobs(ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The dense distribution the cache stands for: (L, k) ids and log-probs, (L,) tail -> (L, V) log-probs.

    The tail mass is spread evenly over the V − k ids outside the top-k (the cache's tail policy). Dense:
    for tests and benchmarks only, never in a training batch.
    """
    L, k = ids.shape
    norm = sparse_target(logprobs, tail)
    spread = norm[:, k] - torch.log(torch.tensor(float(max(vocab_size - k, 1))))
    out = spread.unsqueeze(1).expand(L, vocab_size).clone()
    if vocab_size == k:
        out.fill_(float("-inf"))
    return out.scatter_(1, ids.long(), norm[:, :k])


def kl_full_vs_cache(full_logprobs: torch.Tensor, rebuilt: torch.Tensor) -> torch.Tensor:
    """KL(full ‖ rebuilt) per position: (L, V), (L, V) -> (L,) nats."""
    p = full_logprobs.exp()
    terms = torch.where(p > 0, p * (full_logprobs - rebuilt), torch.zeros_like(p))
    return terms.sum(-1)


from kdflow.store.outputs import file_sha256  # noqa: E402,F401 (reader and writer import it from here)

# ---- writing ------------------------------------------------------------------------------------------


def shard_ids(rows: list[TopK]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The shard's id table (its distinct top-k ids, most frequent first) and each row's ids as ranks in it.

    Top-k candidates concentrate on a few thousand common tokens, so ranks are small where it matters and
    take 1–2 bytes whatever the vocabulary's size or order; the table costs one id per distinct token.

    Counted with ``bincount`` (ids are below the vocabulary size) rather than ``np.unique``, whose argsort
    over every stored id took ~0.1 s per shard of 15k positions at k = 50 (bincount: a few ms). Same table:
    equally frequent ids stay in ascending order.
    """
    flat = np.concatenate([r.ids.ravel() for r in rows])
    counts = np.bincount(flat)
    uniq = np.flatnonzero(counts)  # ascending
    table = uniq[np.argsort(-counts[uniq], kind="stable")]
    rank = np.zeros(len(counts), dtype=np.int64)
    rank[table] = np.arange(len(table))
    ranks = rank[flat]
    bounds = np.cumsum([0, *(r.ids.size for r in rows)])
    return table, [ranks[a:b].reshape(r.ids.shape) for r, a, b in zip(rows, bounds[:-1], bounds[1:])]


def write_shard(path: Path, rows: list[TopK], k: int, id_bytes: int, encoding: ValueEncoding) -> dict:
    """Write one shard atomically (``.part`` then rename); returns its manifest entry."""
    for r in rows:
        L = len(r.input_ids) - 1 - r.start
        if r.ids.ndim != 2 or r.ids.shape[1] != k or not 0 < len(r.ids) <= L or r.logprobs.shape != r.ids.shape:
            raise ValueError(
                f"row {r.row_id!r}: ids {r.ids.shape} / logprobs {r.logprobs.shape} do not fit "
                f"positions {r.start}..{len(r.input_ids) - 2} with k={k}"
            )
    vocab, local = shard_ids(rows)
    width = id_bytes_for(len(vocab))
    table = pa.table(
        {
            "row_id": [r.row_id for r in rows],
            "start": [r.start for r in rows],
            "input_ids": [encode_ids(r.input_ids, id_bytes) for r in rows],
            "ids": [encode_ids(ids, width) for ids in local],
            "values": [encode_values(r.logprobs, encoding) for r in rows],
            "tail": [np.asarray(r.tail, dtype="<f2").tobytes() for r in rows],
        },
        schema=SCHEMA.with_metadata({ID_TABLE: encode_ids(vocab, id_bytes), LOCAL_ID_BYTES: str(width)}),
    )
    part = path.with_name(f".{path.name}.part")
    pq.write_table(table, part, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    os.replace(part, path)
    return {
        "file": path.name,
        "rows": len(rows),
        "positions": int(sum(len(r.ids) for r in rows)),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "row_ids": [r.row_id for r in rows],
    }


def cache_meta(
    *,
    teachers: list[dict],
    tokenizer,
    vocab_size: int,
    k: int,
    temperature: float,
    encoding: ValueEncoding,
    source: str,
) -> dict:
    """The cache manifest minus its shards. ``teachers``: [{"model", "revision", "weight"}]."""
    if k > vocab_size:
        raise ValueError(f"k={k} exceeds the vocabulary ({vocab_size}); use k <= {vocab_size}")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teachers": teachers,
        **tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "k": k,
        "temperature": temperature,
        "value_encoding": encoding.value,
        "id_bytes": id_bytes_for(vocab_size),
        "id_encoding": "per-shard frequency table + ranks, byte planes",
        "source": source,
        "tail": "log(1 - sum of top-k p), float16; rebuilt spread evenly over the other V - k ids",
    }


def write_manifest(folder: Path, meta: dict, shards: list[dict]) -> dict:
    manifest = {
        **meta,
        "rows": sum(s["rows"] for s in shards),
        "positions": sum(s["positions"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }
    part = folder / f".{MANIFEST}.part"
    part.write_text(json.dumps(manifest, indent=1))
    os.replace(part, folder / MANIFEST)
    return manifest


def cache_row_id(row: dict) -> str:
    """The id a KD collator looks a training row up by (the curate stage's row name)."""
    return f"{row['id']}/{row.get('sample', 0)}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"
