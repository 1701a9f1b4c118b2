"""Answer shards: paid teacher answers survive partial writes and damaged lines (kdflow/teacher/answer_shards.py)."""

import pytest

from kdflow.teacher.answer_shards import ShardWriter, read_shards


def test_a_write_taken_in_part_is_completed_or_its_torn_line_ended(tmp_path, monkeypatch, caplog):
    import errno
    import os

    real = os.write
    with ShardWriter(tmp_path) as w:
        w.append({"id": "a", "sample": 0, "ok": True, "text": "a"})
        # The kernel takes half the bytes, then the rest: the record is completed, not torn.
        calls = []
        monkeypatch.setattr(
            os, "write", lambda fd, b: calls.append(len(b)) or real(fd, bytes(b)[: max(1, len(b) // 2)])
        )
        w.append({"id": "b", "sample": 0, "ok": True, "text": "b" * 50})
        assert len(calls) > 1
        # A full disk after part of a record: the append fails, the next record starts on a line of its own.
        monkeypatch.setattr(
            os,
            "write",
            lambda fd, b: (
                real(fd, bytes(b)[:10])
                if len(b) > 20
                else (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
            ),
        )
        with pytest.raises(OSError):
            w.append({"id": "c", "sample": 0, "ok": True, "text": "c" * 50})
        monkeypatch.setattr(os, "write", real)
        w.append({"id": "d", "sample": 0, "ok": True, "text": "d"})
    answers, _ = read_shards(tmp_path)
    assert set(answers) == {("a", 0), ("b", 0), ("d", 0)}  # c, torn in the middle, is asked again
    assert "line 3 is not a whole record; skipped" in caplog.text


def test_a_damaged_line_in_a_shard_costs_that_line_not_the_shard(tmp_path, caplog):
    with ShardWriter(tmp_path) as w:
        w.append({"id": "a", "sample": 0, "ok": True, "text": "a"})
    with open(w.path, "ab") as f:
        f.write(b'{"id": "x", "sam\n{"no": "key"}\n')
    with ShardWriter(tmp_path) as w2:
        w2.append({"id": "b", "sample": 0, "ok": True, "text": "b"})
    answers, _ = read_shards(tmp_path)
    assert set(answers) == {("a", 0), ("b", 0)}
    assert caplog.text.count("not a whole record") == 2
