"""Logit datasets in and out: a kdflow cache exported as DistillKit's compressed parquet or axolotl's KD columns, and
either imported into a kdflow cache that a student trains from (``kdflow logit-cache-export`` / ``-import``).

The formats: kdflow/logit_cache/distillkit.py and kdflow/logit_cache/axolotl.py (each cites the source it follows).
An export is a folder of ``data_<i>.parquet`` files (one per cache shard; DistillKit's also holds its
``compression_config.yaml``); each file's parquet metadata carries, under ``kdflow``, its rows' ids and spans and the
cache's tokenizer fingerprint, which the other tools ignore and an import reads back. An import is a kdflow cache
(shards and ``cache.json``) with the stage contract's ``manifest.json`` written last, built under a temporary name and
renamed into place.

What an import checks before anything is written, each failure naming the file, the row and the fix: the file is
whole parquet (a truncated file is refused), the columns of a row have equal lengths and one top-k width, every id is
below the vocabulary and every input token is in the tokenizer, every log-prob is finite, and — for kdflow's own
exports — the tokenizer and chat template are the ones the cache was made with. The cache it writes records the
tokenizer given, so a student with another one is refused exactly as for a captured cache.

Precision: ids are exact. Log-probs: axolotl's columns are float32 (a u8 or fp16 cache comes back exactly); DistillKit
exports default to float16 values (``distillkit.lossless``: exact for u8 and fp16 caches), and its budget layout's
polynomial is lossy (its error is what DistillKit's own capture has). The tail: kdflow's exports carry it
(``kdflow_tail``); a foreign file's tail is ``log(1 − Σ top-k p)``, as DistillKit's ``SYMMETRIC_UNIFORM`` reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdflow.config.logit_cache import LogitFormat, ValueEncoding, data_files
from kdflow.logit_cache import axolotl, distillkit
from kdflow.logit_cache.columns import Imported, LogitFileError, distribution_problem, where
from kdflow.logit_cache.format import (
    MANIFEST,
    TopK,
    cache_meta,
    id_bytes_for,
    shard_name,
    tail_from_topk,
    write_manifest,
    write_shard,
)
from kdflow.logit_cache.reader import LogitCache, check_tokenizer
from kdflow.store.outputs import file_sha256, finish

FORMATS = tuple(f.value for f in LogitFormat)
METADATA = b"kdflow"  # per exported file: row ids, spans, the cache's fingerprint
STAGE, VERSION = "logit-cache-import", "1"
BATCH_ROWS = 256  # rows read from a file at a time


# ---- export --------------------------------------------------------------------------------------------


def find_cache(path: str | Path) -> Path:
    """A cache folder (with ``cache.json``), or a run folder holding exactly one finished logit cache."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    found = sorted(p.parent for p in path.glob("logit-cache/*/" + MANIFEST))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(
            f"{path}: neither a logit cache ({MANIFEST}) nor a run folder with a finished one "
            "(logit-cache/<key>/); pass the cache folder itself"
        )
    raise ValueError(f"{path} holds {len(found)} logit caches ({', '.join(str(p) for p in found)}); pass one of them")


def export_cache(
    source: str | Path, out: str | Path, fmt: str, layout: distillkit.Layout | None = None, with_tail: bool = True
) -> dict:
    """Write the cache at ``source`` (or a run folder's) to the folder ``out`` in ``fmt``; returns the sizes.

    ``layout``: DistillKit's compression (default ``distillkit.lossless(k)``). ``with_tail``: add ``kdflow_tail``."""
    _check_format(fmt)
    cache = LogitCache.open(find_cache(source))
    meta = cache.manifest
    layout = layout or distillkit.lossless(meta["k"])
    if fmt == "distillkit" and layout.k != meta["k"]:
        raise ValueError(
            f"the layout's k={layout.k}, the cache's k={meta['k']}: DistillKit stores exactly k per "
            f"position; use a layout with k: {meta['k']}"
        )
    out = Path(out)
    with _building(out) as tmp:
        files, tokens = [], 0
        for s, shard in enumerate(meta["shards"]):
            rows = [cache[row_id] for row_id in shard["row_ids"]]
            rows = [
                TopK(r.row_id, r.input_ids.numpy(), r.start, r.ids.numpy(), r.logprobs.numpy(), r.tail.numpy())
                for r in rows
            ]
            tokens += sum(len(r.input_ids) for r in rows)
            table = (
                distillkit.table_of(rows, layout, meta["vocab_size"], with_tail)
                if fmt == "distillkit"
                else axolotl.table_of(rows, meta["k"], with_tail)
            )
            tag = {
                "row_ids": [r.row_id for r in rows],
                "spans": [[r.start, len(r.ids)] for r in rows],
                "tokens_sha256": [tokens_digest(r.input_ids) for r in rows],  # each row's sequence, for the import
                "cache": {
                    key: meta[key]
                    for key in (
                        "teachers",
                        "tokenizer_sha256",
                        "chat_template_sha256",
                        "tokenizer_size",
                        "vocab_size",
                        "k",
                        "temperature",
                        "value_encoding",
                    )
                },
            }
            path = tmp / f"data_{s}.parquet"
            pq.write_table(table.replace_schema_metadata({METADATA: json.dumps(tag)}), path)
            files.append(path)
        if fmt == "distillkit":
            distillkit.write_config(tmp / distillkit.CONFIG_FILE, layout, meta["vocab_size"])
        size = sum(f.stat().st_size for f in files)
    return {
        "format": fmt,
        "out": str(out),
        "files": len(files),
        "rows": meta["rows"],
        "positions": meta["positions"],
        "bytes": size,
        "bytes_per_position": round(size / max(meta["positions"], 1), 2),
        "bytes_per_token": round(size / max(tokens, 1), 2),
        "cache_bytes": meta["bytes"],
        "cache_bytes_per_position": round(meta["bytes"] / max(meta["positions"], 1), 2),
    }


# ---- import --------------------------------------------------------------------------------------------


def import_file(
    source: str | Path,
    out: str | Path,
    fmt: str,
    tokenizer,
    *,
    vocab_size: int | None = None,
    config: str | Path | None = None,
    teacher: str | None = None,
    encoding: ValueEncoding | None = None,
    temperature: float | None = None,
    shard_rows: int = 1024,
) -> dict:
    """Read ``source`` (a file or a folder of them) in ``fmt`` into a new kdflow cache at ``out``; returns its
    cache manifest. ``tokenizer``: the one the file's token ids come from (the student's). ``config``: DistillKit's
    ``compression_config.yaml`` (default: the one beside the files). The other settings default to what a kdflow
    export recorded, else: ``vocab_size`` DistillKit's ``d`` or the tokenizer's length, u8 values, temperature 1."""
    _check_format(fmt)
    files = data_files(source)
    with _building(Path(out)) as tmp:
        manifest = import_into(
            tmp,
            files,
            fmt,
            tokenizer,
            vocab_size=vocab_size,
            config=config,
            teacher=teacher,
            encoding=encoding,
            temperature=temperature,
            shard_rows=shard_rows,
        )
        key = hashlib.sha256(
            json.dumps(
                {
                    "files": manifest["imported_from"],
                    "format": fmt,
                    "k": manifest["k"],
                    "vocab": manifest["vocab_size"],
                    "encoding": manifest["value_encoding"],
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()
        finish(
            tmp,
            STAGE,
            key,
            inputs={"format": fmt, "files": manifest["imported_from"]},
            rows=manifest["rows"],
            **import_figures(manifest),
        )
    return manifest


def import_figures(manifest: dict) -> dict:
    """What a stage manifest records of an imported cache's size, from its cache manifest."""
    return {
        "positions": manifest["positions"],
        "bytes": manifest["bytes"],
        "cache_manifest": MANIFEST,
        "bytes_per_position": round(manifest["bytes"] / max(manifest["positions"], 1), 2),
    }


def import_into(
    tmp: Path,
    files: list[Path],
    fmt: str,
    tokenizer,
    *,
    vocab_size: int | None = None,
    config: str | Path | None = None,
    teacher: str | None = None,
    encoding: ValueEncoding | None = None,
    temperature: float | None = None,
    shard_rows: int = 1024,
    digests: list[str] | None = None,
) -> dict:
    """Read ``files`` in ``fmt`` into the cache folder ``tmp`` (shards, ``cache.json``; the caller finishes it);
    returns its cache manifest. ``digests``: the files' sha256, where the caller has them."""
    _check_format(fmt)
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(
            f"vocab_size {vocab_size}: give the teacher's logits per position (at least 1), or leave it unset"
        )
    source = files[0] if len(files) == 1 else files[0].parent
    digests = digests or [file_sha256(f) for f in files]
    if len(set(digests)) < len(digests):  # the same sequences twice, under other row ids: refused, not imported twice
        first = digests.index(next(d for d in digests if digests.count(d) > 1))
        twin = digests.index(digests[first], first + 1)
        raise LogitFileError(
            f"{files[twin]}: the same bytes as {files[first]}; each row would be imported twice: remove the copy"
        )
    tags = [_tag(f) for f in files]
    cached = next((t["cache"] for t in tags if t), None)
    if cached is not None:  # kdflow's own export: the tokenizer must be the one its cache was made with
        check_tokenizer(cached, tokenizer, files[0])
    recorded = (cached or {}).get("teachers")  # a kdflow export's teachers (an ensemble's, with their weights)
    if teacher and recorded and [t["model"] for t in recorded] != [teacher]:
        raise LogitFileError(
            f"{source}: a kdflow export, which records its teachers {[t['model'] for t in recorded]}; the teacher "
            f"{teacher!r} given would contradict it: drop the teacher name (the export's record is kept)"
        )
    layout, d = None, None
    if fmt == "distillkit":
        config = Path(config) if config else (files[0].parent / distillkit.CONFIG_FILE)
        if not config.is_file():
            raise FileNotFoundError(
                f"{config}: DistillKit's compression config is needed to decode its columns; pass "
                "--distillkit-config (the compression_config.yaml its capture wrote)"
            )
        layout, d = distillkit.read_config(config)
    vocab_size = vocab_size or (cached or {}).get("vocab_size") or d or len(tokenizer)
    if d is not None and d > vocab_size:
        raise ValueError(
            f"{config}: d={d} ids, but the vocabulary is {vocab_size}; pass --vocab-size (the teacher's "
            "logits per position, the student's vocab_size)"
        )
    k = layout.k if layout else (cached or {}).get("k")
    encoding = encoding or ValueEncoding((cached or {}).get("value_encoding", "u8"))
    rows = _topk_rows(files, tags, fmt, layout, d, vocab_size, len(tokenizer))
    shards, batch, seen, computed = [], [], set(), 0
    for r, tail_computed in rows:
        computed += tail_computed
        if r.row_id in seen:
            raise LogitFileError(f"{source}: row id {r.row_id!r} twice; the cache is looked up by row id")
        seen.add(r.row_id)
        k = k or r.ids.shape[1]
        if r.ids.shape[1] != k:
            raise LogitFileError(
                f"{source}: row {r.row_id!r} has top-{r.ids.shape[1]}, the rows before top-{k}; a cache has one k"
            )
        batch.append(r)
        if len(batch) == shard_rows:
            shards.append(write_shard(tmp / shard_name(len(shards)), batch, k, id_bytes_for(vocab_size), encoding))
            batch = []
    if batch:
        shards.append(write_shard(tmp / shard_name(len(shards)), batch, k, id_bytes_for(vocab_size), encoding))
    if not shards:
        raise LogitFileError(f"{source}: no rows")
    teachers = recorded or [{"model": teacher or f"{fmt}:{files[0]}", "revision": None, "weight": 1.0}]
    meta = cache_meta(
        teachers=teachers,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        k=k,
        temperature=temperature or (cached or {}).get("temperature", 1.0),
        encoding=encoding,
        source=f"import:{fmt}",
    )
    meta["tail"] = _tail_note(computed, len(seen), fmt)
    meta["imported_from"] = [{"file": str(f), "sha256": digest} for f, digest in zip(files, digests)]
    manifest = write_manifest(tmp, meta, shards)
    LogitCache.open(tmp, expect_tokenizer=tokenizer, expect_vocab_size=vocab_size).verify()
    return manifest


def _topk_rows(files, tags, fmt, layout, d, vocab_size: int, tokens: int) -> Iterator[tuple[TopK, bool]]:
    """Every row of every file, checked, as ``TopK`` with the tail filled in; and whether that tail was computed
    (the file had none)."""
    for file, tag in zip(files, tags):
        at = 0
        rows = pq.ParquetFile(file).metadata.num_rows if tag else 0
        for key in ("row_ids", "spans", "tokens_sha256") if tag else ():
            if key in tag and (not isinstance(tag[key], list) or len(tag[key]) != rows):
                raise LogitFileError(
                    f"{file}: its kdflow metadata lists {key} for {len(tag[key]) if isinstance(tag[key], list) else 0}"
                    f" rows, and the file holds {rows}: the metadata or the rows were edited after the export; export "
                    "the cache again"
                )
        for batch in _batches(file):
            spans = tag["spans"][at : at + batch.num_rows] if tag else None
            read = (
                distillkit.rows_of(batch, layout, d, file, at, spans)
                if fmt == "distillkit"
                else axolotl.rows_of(batch, file, at)
            )
            for r in read:
                digests = (tag or {}).get("tokens_sha256")  # exports since 2026-12-06 (older ones: the spans alone)
                if digests and digests[r.row] != tokens_digest(r.input_ids):
                    raise LogitFileError(
                        f"{where(file, r.row)}: its tokens are not the sequence the file's kdflow metadata lists as "
                        f"row {tag['row_ids'][r.row]!r}: the rows were reordered or edited after the export, and the "
                        "row ids would name other sequences; export the cache again"
                    )
                if tag and list(tag["spans"][r.row]) != [r.start, len(r.ids)]:  # the rows are not the ones it lists
                    raise LogitFileError(
                        f"{where(file, r.row)}: positions {r.start}-{r.start + len(r.ids) - 1}, where the file's "
                        f"kdflow metadata lists row {tag['row_ids'][r.row]!r} at {tag['spans'][r.row][0]}-"
                        f"{sum(tag['spans'][r.row]) - 1}: the rows were reordered or edited after the export, and "
                        "the row ids would name other sequences; export the cache again"
                    )
                row_id = tag["row_ids"][r.row] if tag else f"{file.stem}/{r.row}"
                yield _checked(r, file, row_id, vocab_size, tokens), r.tail is None
            at += batch.num_rows


def _checked(r: Imported, file: Path, row_id: str, vocab_size: int, tokens: int) -> TopK:
    at = where(file, r.row)
    if not len(r.ids):
        raise LogitFileError(f"{at}: no teacher positions in it (labels or target_mask mark none); drop the row")
    if r.input_ids.size and (r.input_ids.min() < 0 or r.input_ids.max() >= tokens):
        bad = int(np.flatnonzero((r.input_ids < 0) | (r.input_ids >= tokens))[0])
        raise LogitFileError(
            f"{where(file, r.row, bad)}: input token {r.input_ids[bad]} is not in the tokenizer "
            f"({tokens} tokens): the file was made with another tokenizer; pass --tokenizer of the "
            "model whose tokens these are"
        )
    if r.ids.min() < 0 or r.ids.max() >= vocab_size:
        j = int(np.flatnonzero(((r.ids < 0) | (r.ids >= vocab_size)).any(-1))[0])
        bad = r.ids[j][(r.ids[j] < 0) | (r.ids[j] >= vocab_size)][0]
        raise LogitFileError(
            f"{where(file, r.row, r.start + j)}: top-k id {bad} is outside the vocabulary "
            f"(0 to {vocab_size - 1}): pass --vocab-size of the teacher whose logits these are, or "
            "check the file's tokenizer"
        )
    if not np.isfinite(r.logprobs).all() or (r.tail is not None and not np.isfinite(r.tail).all()):
        in_topk = not np.isfinite(r.logprobs).all()
        j = int(np.flatnonzero(~np.isfinite(r.logprobs).all(-1) if in_topk else ~np.isfinite(r.tail))[0])
        raise LogitFileError(
            f"{where(file, r.row, r.start + j)}: {'a log-prob' if in_topk else 'the tail (kdflow_tail)'} is not "
            "finite (NaN or -inf); a student would train on it: recapture the row or drop it"
        )
    if (problem := distribution_problem(r.ids, r.logprobs, r.tail)) is not None:
        raise LogitFileError(f"{where(file, r.row, r.start + problem[0])}: {problem[1]}")
    logprobs = r.logprobs.astype(np.float32)
    tail = r.tail if r.tail is not None else tail_from_topk(logprobs)
    return TopK(row_id, r.input_ids.astype(np.int64), r.start, r.ids, logprobs, np.asarray(tail, dtype=np.float32))


def _batches(file: Path) -> Iterator[pa.RecordBatch]:
    try:
        reader = pq.ParquetFile(file)
        yield from reader.iter_batches(batch_size=BATCH_ROWS)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise LogitFileError(
            f"{file}: not a whole parquet file ({e}): truncated or damaged; copy or export it again"
        ) from None


def tokens_digest(input_ids) -> str:
    """A row's token sequence, hashed (as 64-bit ids, whatever width a format stores them in)."""
    return hashlib.sha256(np.asarray(input_ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def _tag(file: Path) -> dict | None:
    """The ``kdflow`` metadata of one of kdflow's exports, else None (a file another tool wrote)."""
    try:
        meta = pq.read_schema(file).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        raise LogitFileError(
            f"{file}: not a whole parquet file ({e}): truncated or damaged; copy or export it again"
        ) from None
    return json.loads(meta[METADATA]) if METADATA in meta else None


def _tail_note(computed: int, rows: int, fmt: str) -> str:
    stored = "log(1 - sum of top-k p), float16; rebuilt spread evenly over the other V - k ids"
    if not computed:
        return f"{stored}; as the exported kdflow cache stored it (kdflow_tail)"
    return (
        f"{stored}; computed from the top-k log-probs of the {fmt} file, which stores no tail ({computed} of {rows} "
        "rows), floored at e^-30: the floor where the file's top-k were renormalised to sum 1"
    )


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")


class _building:
    """A folder built under a temporary name beside ``out`` and renamed to ``out`` on success (removed on failure);
    an existing ``out`` is refused, never overwritten."""

    def __init__(self, out: Path):
        self.out = Path(out)
        if self.out.exists():
            raise FileExistsError(f"{self.out} exists; choose another path or remove it")
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, kind, value, tb):
        if kind is None:
            os.rename(self.tmp, self.out)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False
