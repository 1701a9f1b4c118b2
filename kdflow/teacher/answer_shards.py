"""Durable teacher answers: append-only JSON-lines shards, one record per (row id, sample index).

Teacher calls cost money and hours, so every answer is written the moment it arrives, and a rerun asks only
for what no shard holds yet. Each writing process appends to a shard file of its own (no two writers share a
file), one ``os.write`` per record: a SIGKILL loses only the requests still in flight, and at worst tears
the last line of its own shard, which the reader skips (that request is simply asked again). A write the
kernel takes only in part (a full disk, a signal) is completed or, if it fails, ends the torn line so the next
record starts on a line of its own; the reader skips any line that is not a whole record, with a warning,
instead of refusing the shard and every paid answer in it. Records are
never rewritten; a later success supersedes an earlier failure of the same (id, sample), and the first
success wins over any duplicate (two runs racing on the same folder), so the result has exactly one answer
per (prompt, sample).

Durability is against a killed process (the OS still holds what was written), not against a power cut:
there is no fsync per record, which would cost more than most teacher calls save.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

Key = tuple[str, int]  # (row id, sample index)
log = logging.getLogger(__name__)


def record_key(record: dict) -> Key:
    return str(record["id"]), int(record["sample"])


class ShardWriter:
    """Appends records to a fresh shard file in ``folder``; one per writing process."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"shard-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._torn = False  # a write failed part way: the shard ends in a line without its newline

    def append(self, record: dict) -> None:
        """``record`` needs ``id``, ``sample`` and ``ok`` (True: an answer; False: a failure with a reason)."""
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        if self._torn:  # end the torn line first, so that this record is a line of its own
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:  # os.write may take fewer bytes than asked (a full disk, a signal): write the rest
                view = view[os.write(self._fd, view) :]
        except OSError:
            self._torn = len(view) < len(data) or self._torn
            raise
        self._torn = False

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _records(shard: Path):
    lines = shard.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            record = json.loads(line)
            record_key(record), record["ok"]
        except (ValueError, KeyError, TypeError):  # torn (a killed writer, a failed write) or damaged
            if i < len(lines) - 1:  # the torn last line of a killed writer is expected; anything else is said
                log.warning(f"{shard}: line {i + 1} is not a whole record; skipped (that request is asked again)")
            continue
        yield record


def read_shards(folder: Path) -> tuple[dict[Key, dict], dict[Key, dict]]:
    """(answers, failures): the first successful record per key, and the last failure of keys without one."""
    answers: dict[Key, dict] = {}
    failures: dict[Key, dict] = {}
    shards = (
        sorted(folder.glob("shard-*.jsonl"), key=lambda p: (p.stat().st_mtime_ns, p.name)) if folder.is_dir() else []
    )
    for shard in shards:
        for record in _records(shard):
            key = record_key(record)
            if record["ok"]:
                answers.setdefault(key, record)
            else:
                failures[key] = record
    return answers, {k: v for k, v in failures.items() if k not in answers}


def adopt_folder(old: Path, new: Path) -> bool:
    """Move the records in ``old`` to ``new`` when only ``old`` has any (a folder named by a key that older code
    computed from less content): paid answers are never asked twice because a key grew. True when moved."""
    if Path(new).exists() or not Path(old).is_dir():
        return False
    try:
        os.rename(old, new)
    except FileNotFoundError:  # another process moved it first
        return False
    log.warning(f"{old}: answers recorded before its key named the model's identity, kept as {Path(new).name}")
    return True
