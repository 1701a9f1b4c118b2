"""Writing a logit cache shard by shard, resumable: a crashed capture keeps every whole shard (checked by its
checksum) and computes only the rest. The format itself: kdflow/logit_cache/format.py."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from kdflow.config.logit_cache import ValueEncoding
from kdflow.logit_cache.format import (
    CAPTURE_SETTINGS,
    MANIFEST,
    TopK,
    file_sha256,
    shard_name,
    write_manifest,
    write_shard,
)
from kdflow.logit_cache.scoring import check_scores
from kdflow.store.outputs import write_atomic


def _teachers(meta: dict) -> str:
    return ", ".join(str(t.get("model")) for t in meta.get("teachers", [])) or "unnamed"


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


def capture_shards(
    folder: Path,
    row_ids: list[str],
    shard_rows: int,
    meta: dict,
    compute: Callable[[list[int]], list[TopK]],
    on_shard=None,
) -> dict:
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
            # Before the shard exists: a NaN or -inf stored in the cache (u8 would even clamp it to a plausible
            # value) trains every student on it, and a finished shard is never captured again.
            check_scores(
                (list(range(begin, begin + len(ids))), rows),
                meta.get("vocab_size"),
                f"the teacher ({_teachers(meta)}), capturing shard {index},",
                "the cache's vocabulary",
            )
            entry = write_shard(
                folder / shard_name(index), rows, meta["k"], meta["id_bytes"], ValueEncoding(meta["value_encoding"])
            )
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
