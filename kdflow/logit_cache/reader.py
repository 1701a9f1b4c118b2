"""Reading a logit cache by row id (``cache[row_id]``) or in order, in bounded memory. The format itself:
kdflow/logit_cache/format.py."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdflow.config.logit_cache import ValueEncoding
from kdflow.logit_cache.format import (
    FORMAT,
    FORMAT_VERSION,
    ID_TABLE,
    LOCAL_ID_BYTES,
    MANIFEST,
    OPEN_SHARDS,
    READ_BUDGET_BYTES,
    ROW_GROUP_ROWS,
    SCHEMA,
    CachedRow,
    CacheMismatch,
    CorruptShard,
    TopK,
    decode_ids,
    decode_values,
    file_sha256,
)
from kdflow.models.tokenizer_identity import tokenizer_fingerprint


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
    def open(
        cls,
        folder: str | Path,
        expect_tokenizer=None,
        expect_vocab_size: int | None = None,
        read_budget_bytes: int = READ_BUDGET_BYTES,
    ) -> "LogitCache":
        """Open a cache; with ``expect_tokenizer`` (the student's) refuse one made for other token ids."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {MANIFEST}: not a logit cache, or its capture never finished")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise CacheMismatch(
                f"{folder}: format {manifest.get('format')!r} v{manifest.get('format_version')}, "
                f"this reader reads {FORMAT!r} v{FORMAT_VERSION}"
            )
        if expect_tokenizer is not None:
            check_tokenizer(manifest, expect_tokenizer, folder)
        if expect_vocab_size is not None and expect_vocab_size != manifest["vocab_size"]:
            raise CacheMismatch(
                f"{folder}: vocab size mismatch: the cache has {manifest['vocab_size']} teacher "
                f"logits per position, the student {expect_vocab_size}"
            )
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
            out.append(
                TopK(
                    row_id,
                    decode_ids(input_ids, self.id_bytes, 1).reshape(-1),
                    start,
                    vocab[decode_ids(ids, width, self.k)],
                    decode_values(values, self.encoding, self.k),
                    np.frombuffer(tail, dtype="<f2").astype(np.float32),
                )
            )
        return out


def as_tensors(r: TopK) -> CachedRow:
    return CachedRow(
        r.row_id,
        torch.from_numpy(r.input_ids),
        r.start,
        torch.from_numpy(r.positions),
        torch.from_numpy(r.ids),
        torch.from_numpy(r.logprobs),
        torch.from_numpy(r.tail),
    )


def check_tokenizer(manifest: dict, tokenizer, where) -> None:
    """Raise ``CacheMismatch`` naming what differs between the cache's tokenizer and ``tokenizer``."""
    mine = tokenizer_fingerprint(tokenizer)
    if mine["tokenizer_size"] > manifest["vocab_size"]:
        raise CacheMismatch(
            f"{where}: vocab mismatch: the student's tokenizer has {mine['tokenizer_size']} tokens, "
            f"the cache's teacher only {manifest['vocab_size']} logits per position"
        )
    if mine["tokenizer_sha256"] != manifest["tokenizer_sha256"]:
        raise CacheMismatch(
            f"{where}: tokenizer mismatch: the cache was captured with another tokenizer "
            "(different vocabulary, merges or pre-tokenizer); its token ids mean other tokens here"
        )
    if mine["chat_template_sha256"] != manifest["chat_template_sha256"]:
        raise CacheMismatch(
            f"{where}: chat template mismatch: the cache's sequences were rendered with another "
            "chat template, so its positions do not line up with the student's"
        )
