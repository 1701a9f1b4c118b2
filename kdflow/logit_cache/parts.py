"""A logit cache captured in parts, one per worker, then joined into one cache.

The parts are cut on shard boundaries (``part_bounds``): part ``p`` holds whole shards of ``shard_rows`` rows,
in row order, so joining them (``join_parts``) gives the same shards — same rows, same files, same manifest
entries — as one process capturing every row. Each part is an ordinary cache folder written by
``logit_cache.capture_shards``, so a worker that dies resumes from its last finished shard.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kdflow.logit_cache.format import MANIFEST, shard_name, write_manifest

COUNTS = ("rows", "positions", "bytes", "shards")  # a cache manifest's fields that are not its settings


def part_bounds(rows: int, shard_rows: int, parts: int) -> list[tuple[int, int]]:
    """``(begin, end)`` row bounds of each part: whole shards, as even as shards allow (a part may be empty)."""
    if parts < 1:
        raise ValueError(f"parts={parts}: capture in at least one part")
    shards = -(-rows // shard_rows)
    cuts = [min(p * shards // parts * shard_rows, rows) for p in range(parts)] + [rows]
    return list(zip(cuts[:-1], cuts[1:]))


def join_parts(parts: list[Path], folder: Path) -> dict:
    """Join the finished caches ``parts`` (in row order) into one cache in ``folder``; returns its manifest.

    Shard files are hard-linked (copied where the file system has no links), so the parts stay whole until
    the joined cache is complete: a join that dies is simply done again. The joined folder is built under a
    temporary name, its manifest written last, and renamed into place.
    """
    manifests = [json.loads((Path(p) / MANIFEST).read_text()) for p in parts]
    meta = {k: v for k, v in manifests[0].items() if k not in COUNTS}
    for part, m in zip(parts[1:], manifests[1:]):
        if {k: v for k, v in m.items() if k not in COUNTS} != meta:
            raise ValueError(f"{part} was captured with other settings than {parts[0]}: capture every part alike")
    seen: set[str] = set()
    for part, m in zip(parts, manifests):
        ids = [row_id for shard in m["shards"] for row_id in shard["row_ids"]]
        if seen.intersection(ids) or len(set(ids)) != len(ids):
            raise ValueError(f"{part} holds rows another part holds too: parts must not overlap")
        seen.update(ids)

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.joining")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = []
    for part, m in zip(parts, manifests):
        for entry in m["shards"]:
            name = shard_name(len(shards))
            link_or_copy(Path(part) / entry["file"], tmp / name)
            shards.append({**entry, "file": name})
    manifest = write_manifest(tmp, meta, shards)
    if folder.exists():  # a cache left by an earlier attempt (captured whole, or joined): this join replaces it
        shutil.rmtree(folder)
    os.rename(tmp, folder)
    return manifest


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` the same bytes as ``src``, which stays: a hard link, or a copy where links are refused."""
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (some network file systems): copy
        shutil.copyfile(src, dst)
