"""Durable teacher answers: append-only JSON-lines shards, one record per (row id, sample index).

Teacher calls cost money and hours, so every answer is written the moment it arrives, and a rerun asks only
for what no shard holds yet. Each writing process appends to a shard file of its own (no two writers share a
file), one ``os.write`` per record: a SIGKILL loses only the requests still in flight, and at worst tears
the last line of its own shard, which the reader skips (that request is simply asked again). Records are
never rewritten; a later success supersedes an earlier failure of the same (id, sample), and the first
success wins over any duplicate (two runs racing on the same folder), so the result has exactly one answer
per (prompt, sample).

Durability is against a killed process (the OS still holds what was written), not against a power cut:
there is no fsync per record, which would cost more than most teacher calls save.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

Key = tuple[str, int]  # (row id, sample index)


def record_key(record: dict) -> Key:
    return str(record["id"]), int(record["sample"])


class ShardWriter:
    """Appends records to a fresh shard file in ``folder``; one per writing process."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"shard-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict) -> None:
        """``record`` needs ``id``, ``sample`` and ``ok`` (True: an answer; False: a failure with a reason)."""
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

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
            yield json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: the writer was killed mid-line; asked again
                return
            raise ValueError(f"{shard}: line {i + 1} is not JSON and not the torn last line; the shard is damaged")


def read_shards(folder: Path) -> tuple[dict[Key, dict], dict[Key, dict]]:
    """(answers, failures): the first successful record per key, and the last failure of keys without one."""
    answers: dict[Key, dict] = {}
    failures: dict[Key, dict] = {}
    shards = sorted(folder.glob("shard-*.jsonl"), key=lambda p: (p.stat().st_mtime_ns, p.name)) if folder.is_dir() else []
    for shard in shards:
        for record in _records(shard):
            key = record_key(record)
            if record["ok"]:
                answers.setdefault(key, record)
            else:
                failures[key] = record
    return answers, {k: v for k, v in failures.items() if k not in answers}
