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

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdflow.config.logit_cache import ValueEncoding
from kdflow.store.outputs import write_atomic

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
SCHEMA = pa.schema([("row_id", pa.string()), ("start", pa.int32()), ("input_ids", pa.binary()),
                    ("ids", pa.binary()), ("values", pa.binary()), ("tail", pa.binary())])


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

def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    """Hashes of what decides token ids: the tokenizer's model, pre-/post-processing and added tokens
    (not its padding or truncation settings, which do not change ids), and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer", "post_processor", "added_tokens")}
    else:  # a slow tokenizer: its vocabulary is the best identity we have
        spec = sorted(tokenizer.get_vocab().items())
    return {
        "tokenizer_sha256": sha256_text(json.dumps(spec, sort_keys=True)),
        "chat_template_sha256": sha256_text(getattr(tokenizer, "chat_template", None)),
        "tokenizer_size": len(tokenizer),
    }


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


# ---- writing ------------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
            raise ValueError(f"row {r.row_id!r}: ids {r.ids.shape} / logprobs {r.logprobs.shape} do not fit "
                             f"positions {r.start}..{len(r.input_ids) - 2} with k={k}")
    vocab, local = shard_ids(rows)
    width = id_bytes_for(len(vocab))
    table = pa.table({
        "row_id": [r.row_id for r in rows],
        "start": [r.start for r in rows],
        "input_ids": [encode_ids(r.input_ids, id_bytes) for r in rows],
        "ids": [encode_ids(ids, width) for ids in local],
        "values": [encode_values(r.logprobs, encoding) for r in rows],
        "tail": [np.asarray(r.tail, dtype="<f2").tobytes() for r in rows],
    }, schema=SCHEMA.with_metadata({ID_TABLE: encode_ids(vocab, id_bytes), LOCAL_ID_BYTES: str(width)}))
    part = path.with_name(f".{path.name}.part")
    pq.write_table(table, part, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    os.replace(part, path)
    return {"file": path.name, "rows": len(rows), "positions": int(sum(len(r.ids) for r in rows)),
            "bytes": path.stat().st_size, "sha256": file_sha256(path), "row_ids": [r.row_id for r in rows]}


def cache_meta(*, teachers: list[dict], tokenizer, vocab_size: int, k: int, temperature: float,
               encoding: ValueEncoding, source: str) -> dict:
    """The cache manifest minus its shards. ``teachers``: [{"model", "revision", "weight"}]."""
    if k > vocab_size:
        raise ValueError(f"k={k} exceeds the vocabulary ({vocab_size}); use k <= {vocab_size}")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "teachers": teachers, **tokenizer_fingerprint(tokenizer),
            "vocab_size": vocab_size, "k": k, "temperature": temperature, "value_encoding": encoding.value,
            "id_bytes": id_bytes_for(vocab_size), "id_encoding": "per-shard frequency table + ranks, byte planes",
            "source": source,
            "tail": "log(1 - sum of top-k p), float16; rebuilt spread evenly over the other V - k ids"}


def write_manifest(folder: Path, meta: dict, shards: list[dict]) -> dict:
    manifest = {**meta, "rows": sum(s["rows"] for s in shards), "positions": sum(s["positions"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards), "shards": shards}
    part = folder / f".{MANIFEST}.part"
    part.write_text(json.dumps(manifest, indent=1))
    os.replace(part, folder / MANIFEST)
    return manifest


def cache_row_id(row: dict) -> str:
    """The id a KD collator looks a training row up by (the curate stage's row name)."""
    return f"{row['id']}/{row.get('sample', 0)}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def finished_shard(folder: Path, index: int, row_ids: list[str], recorded: dict | None = None) -> dict | None:
    """A shard a previous (crashed) capture finished: its sidecar (or the manifest's entry, ``recorded``)
    lists exactly these rows, and the file still has the recorded checksum. Anything else is redone."""
    sidecar = folder / f"{shard_name(index)}.json"
    try:
        entry = json.loads(sidecar.read_text()) if sidecar.is_file() else recorded
    except json.JSONDecodeError:
        return None
    if entry is None:
        return None
    path = folder / shard_name(index)
    if entry.get("row_ids") != row_ids or not path.is_file() or file_sha256(path) != entry.get("sha256"):
        return None
    return entry


def _read_settings(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError:  # torn by a writer older than write_atomic: which settings its shards used is unknown
        raise ValueError(f"{path} is damaged (not JSON): delete {path.parent} to capture those rows again") from None


def capture_shards(folder: Path, row_ids: list[str], shard_rows: int, meta: dict,
                   compute: Callable[[list[int]], list[TopK]], on_shard=None) -> dict:
    """Write the cache in ``folder`` shard by shard, resuming after a crash.

    Rows are assigned to shards by their order in ``row_ids`` (shard i holds rows i·S … (i+1)·S − 1), so a
    rerun puts every row in the same shard: finished shards are kept (checked by checksum), the rest are
    computed again, and no row is written twice. ``compute(indices)`` returns the ``TopK`` of those rows
    (indices into ``row_ids``), in that order. Only one shard's rows are in memory at a time.
    """
    if len(set(row_ids)) != len(row_ids):
        raise ValueError("row ids must be unique: the cache is looked up by row id")
    folder.mkdir(parents=True, exist_ok=True)
    settings = folder / CAPTURE_SETTINGS
    if settings.is_file() and _read_settings(settings) != meta:
        raise ValueError(f"{folder} holds a capture made with other settings; capture into an empty folder")
    write_atomic(settings, json.dumps(meta))  # never torn: a resume compares it with its own settings
    done = {}  # a finished cache (its sidecars already folded into the manifest) is checked shard by shard too
    if (folder / MANIFEST).is_file():
        finished = json.loads((folder / MANIFEST).read_text())
        if {k: v for k, v in finished.items() if k not in ("rows", "positions", "bytes", "shards")} != meta:
            raise ValueError(f"{folder} holds a cache made with other settings; capture into an empty folder")
        done = dict(enumerate(finished["shards"]))
    shards = []
    for index, begin in enumerate(range(0, len(row_ids), shard_rows)):
        ids = row_ids[begin : begin + shard_rows]
        entry = finished_shard(folder, index, ids, done.get(index))
        if entry is None:
            rows = compute(list(range(begin, begin + len(ids))))
            if [r.row_id for r in rows] != ids:
                raise RuntimeError(f"shard {index}: compute() returned rows out of order")
            entry = write_shard(folder / shard_name(index), rows, meta["k"], meta["id_bytes"],
                                ValueEncoding(meta["value_encoding"]))
            sidecar = folder / f"{shard_name(index)}.json"
            (folder / f".{sidecar.name}.part").write_text(json.dumps(entry))
            os.replace(folder / f".{sidecar.name}.part", sidecar)  # after the shard: a sidecar means a whole shard
        shards.append(entry)
        if on_shard is not None:
            on_shard(index, entry)
    manifest = write_manifest(folder, meta, shards)
    # Sidecars are folded into the manifest; half-written files of a crashed attempt are not part of the cache.
    for leftover in [*folder.glob("shard-*.parquet.json"), *folder.glob(".*.part")]:
        leftover.unlink()
    settings.unlink()
    return manifest


# ---- reading ------------------------------------------------------------------------------------------

class LogitCache:
    """Read a cache by row id (``cache[row_id]``) or stream it in order (``iter_rows()``).

    Memory is bounded: row groups read are kept encoded up to ``read_budget_bytes`` (a row is decoded when
    asked for), shards are never loaded whole.
    """

    def __init__(self, folder: Path, manifest: dict, read_budget_bytes: int = READ_BUDGET_BYTES):
        self.folder, self.manifest = Path(folder), manifest
        self.k, self.vocab_size = manifest["k"], manifest["vocab_size"]
        self.id_bytes, self.encoding = manifest["id_bytes"], ValueEncoding(manifest["value_encoding"])
        self._where: dict[str, tuple[int, int]] = {}
        for s, shard in enumerate(manifest["shards"]):
            for i, row_id in enumerate(shard["row_ids"]):
                self._where[row_id] = (s, i)
        self._verified: set[int] = set()
        self.read_budget_bytes = read_budget_bytes
        self._groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()  # encoded, least recently used first
        self._group_bytes = 0
        self._shards: OrderedDict[int, tuple[pq.ParquetFile, np.ndarray, int]] = OrderedDict()
        self._pid = os.getpid()

    @classmethod
    def open(cls, folder: str | Path, expect_tokenizer=None, expect_vocab_size: int | None = None,
             read_budget_bytes: int = READ_BUDGET_BYTES) -> "LogitCache":
        """Open a cache; with ``expect_tokenizer`` (the student's) refuse one made for other token ids."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {MANIFEST}: not a logit cache, or its capture never finished")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise CacheMismatch(f"{folder}: format {manifest.get('format')!r} v{manifest.get('format_version')}, "
                                f"this reader reads {FORMAT!r} v{FORMAT_VERSION}")
        if expect_tokenizer is not None:
            check_tokenizer(manifest, expect_tokenizer, folder)
        if expect_vocab_size is not None and expect_vocab_size != manifest["vocab_size"]:
            raise CacheMismatch(f"{folder}: vocab size mismatch: the cache has {manifest['vocab_size']} teacher "
                                f"logits per position, the student {expect_vocab_size}")
        return cls(folder, manifest, read_budget_bytes)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, row_id: str) -> bool:
        return row_id in self._where

    @property
    def row_ids(self) -> list[str]:
        return list(self._where)

    def __getitem__(self, row_id: str) -> CachedRow:
        if row_id not in self._where:
            raise KeyError(f"row {row_id!r} is not in the logit cache {self.folder}")
        s, i = self._where[row_id]
        group, offset = divmod(i, ROW_GROUP_ROWS)
        _, vocab, width = self._shard(s)
        return as_tensors(self._decode(self._row_group(s, group).slice(offset, 1), vocab, width)[0])

    def iter_rows(self) -> Iterator[CachedRow]:
        """Every row, shard by shard, one row group at a time."""
        for s, shard in enumerate(self.manifest["shards"]):
            self._verify(s)
            with pq.ParquetFile(self.folder / shard["file"]) as f:
                vocab = self._id_table(f)
                for g in range(f.num_row_groups):
                    yield from (as_tensors(r) for r in self._decode(f.read_row_group(g), *vocab))

    def verify(self) -> None:
        """Check every shard's checksum now (reading each once, streamed)."""
        for s in range(len(self.manifest["shards"])):
            self._verify(s)

    def _verify(self, s: int) -> None:
        if s in self._verified:
            return
        shard = self.manifest["shards"][s]
        path = self.folder / shard["file"]
        if not path.is_file():
            raise CorruptShard(f"{path} is missing")
        if path.stat().st_size != shard["bytes"] or file_sha256(path) != shard["sha256"]:
            raise CorruptShard(f"{path}: checksum mismatch (truncated or corrupt; recapture it, do not train on it)")
        self._verified.add(s)

    def _row_group(self, s: int, group: int) -> pa.Table:
        key = (s, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        table = self._shard(s)[0].read_row_group(group)
        self._groups[key] = table
        self._group_bytes += table.nbytes
        while self._group_bytes > self.read_budget_bytes and len(self._groups) > 1:
            self._group_bytes -= self._groups.popitem(last=False)[1].nbytes
        return table

    def _shard(self, s: int) -> tuple[pq.ParquetFile, np.ndarray, int]:
        """Shard ``s`` open, with its id table: verified once, kept open (a bounded number at a time)."""
        if self._pid != os.getpid():  # a forked DataLoader worker: file handles are not shared across processes
            self._shards.clear()
            self._pid = os.getpid()
        if s in self._shards:
            self._shards.move_to_end(s)
            return self._shards[s]
        self._verify(s)
        f = pq.ParquetFile(self.folder / self.manifest["shards"][s]["file"])
        self._shards[s] = (f, *self._id_table(f))
        if len(self._shards) > OPEN_SHARDS:
            self._shards.popitem(last=False)[1][0].close()
        return self._shards[s]

    def _id_table(self, f: pq.ParquetFile) -> tuple[np.ndarray, int]:
        meta = f.schema_arrow.metadata
        return decode_ids(meta[ID_TABLE], self.id_bytes, 1).reshape(-1), int(meta[LOCAL_ID_BYTES])

    def _decode(self, table: pa.Table, vocab: np.ndarray, width: int) -> list[TopK]:
        cols = table.to_pydict()
        out = []
        for row_id, start, input_ids, ids, values, tail in zip(*(cols[n] for n in SCHEMA.names)):
            out.append(TopK(row_id, decode_ids(input_ids, self.id_bytes, 1).reshape(-1), start,
                            vocab[decode_ids(ids, width, self.k)], decode_values(values, self.encoding, self.k),
                            np.frombuffer(tail, dtype="<f2").astype(np.float32)))
        return out


def as_tensors(r: TopK) -> CachedRow:
    return CachedRow(r.row_id, torch.from_numpy(r.input_ids), r.start, torch.from_numpy(r.positions),
                     torch.from_numpy(r.ids), torch.from_numpy(r.logprobs), torch.from_numpy(r.tail))


def check_tokenizer(manifest: dict, tokenizer, where) -> None:
    """Raise ``CacheMismatch`` naming what differs between the cache's tokenizer and ``tokenizer``."""
    mine = tokenizer_fingerprint(tokenizer)
    if mine["tokenizer_size"] > manifest["vocab_size"]:
        raise CacheMismatch(f"{where}: vocab mismatch: the student's tokenizer has {mine['tokenizer_size']} tokens, "
                            f"the cache's teacher only {manifest['vocab_size']} logits per position")
    if mine["tokenizer_sha256"] != manifest["tokenizer_sha256"]:
        raise CacheMismatch(f"{where}: tokenizer mismatch: the cache was captured with another tokenizer "
                            "(different vocabulary, merges or pre-tokenizer); its token ids mean other tokens here")
    if mine["chat_template_sha256"] != manifest["chat_template_sha256"]:
        raise CacheMismatch(f"{where}: chat template mismatch: the cache's sequences were rendered with another "
                            "chat template, so its positions do not line up with the student's")


# ---- ensembles ----------------------------------------------------------------------------------------

def merge_topk(members: list[TopK], weights: list[float], vocab_size: int, k: int) -> TopK:
    """One sequence's ensemble: the weighted mean of the members' probabilities, then its top-k.

    Each member's distribution is its rebuilt one (top-k, tail spread evenly over the rest), so the mean
    is a distribution; its tail is the mass outside the merged top-k. Works on the union of the members'
    ids per position, never on the full vocabulary.
    """
    first = members[0]
    for m in members[1:]:
        if m.row_id != first.row_id or m.start != first.start or not np.array_equal(m.input_ids, first.input_ids):
            raise ValueError(f"row {first.row_id!r}: the teachers' caches hold different sequences; merge caches "
                             "captured on the same rows with the same tokenizer")
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


def merge_caches(caches: list[LogitCache], weights: list[float], folder: Path, k: int | None = None,
                 encoding: ValueEncoding | None = None) -> dict:
    """Merge several teachers' caches (same rows, same tokenizer) into one cache in ``folder``, streamed."""
    base = caches[0].manifest
    for c in caches[1:]:
        for field in ("tokenizer_sha256", "chat_template_sha256", "vocab_size"):
            if c.manifest[field] != base[field]:
                raise CacheMismatch(f"{c.folder}: {field} differs from {caches[0].folder}'s: an ensemble's teachers "
                                    "must share one tokenizer")
        if set(c.row_ids) != set(caches[0].row_ids):
            raise ValueError(f"{c.folder} holds other rows than {caches[0].folder}: capture every teacher on the same rows")
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

