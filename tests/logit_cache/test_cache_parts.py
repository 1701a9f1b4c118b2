"""A logit cache captured in parts (one per worker) and joined: the same shards as one process capturing every
row, each row exactly once; overlapping or mismatched parts are refused. Fast: a tiny untrained Llama."""

import json

import pytest
import torch

from kdflow.logit_cache.format import MANIFEST
from kdflow.logit_cache.parts import join_parts, part_bounds
from kdflow.logit_cache.reader import LogitCache
from tests.logit_cache.test_logit_cache import model, rows_of, tokenizer, write_cache  # noqa: F401 (fixtures)

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "rows, shard_rows, parts", [(23, 4, 2), (23, 4, 3), (8, 4, 2), (5, 4, 3), (0, 4, 2), (100, 7, 5)]
)
def test_parts_are_whole_shards_covering_every_row_once(rows, shard_rows, parts):
    bounds = part_bounds(rows, shard_rows, parts)
    assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(end == begin for (_, end), (begin, _) in zip(bounds, bounds[1:]))  # contiguous, no overlap
    assert all(begin % shard_rows == 0 for begin, _ in bounds)  # each part starts on a shard boundary
    sizes = [-(-(end - begin) // shard_rows) for begin, end in bounds]
    assert max(sizes) - min(sizes) <= 1  # as even as whole shards allow


def test_joined_parts_are_the_single_process_cache(tmp_path, tokenizer, model):  # noqa: F811
    rows = rows_of(tokenizer, 23)
    whole = write_cache(tmp_path / "whole", tokenizer, model, rows, k=5, shard_rows=4)
    parts = []
    for p, (begin, end) in enumerate(part_bounds(len(rows), 4, 2)):
        write_cache(tmp_path / f"part-{p}", tokenizer, model, rows[begin:end], k=5, shard_rows=4)
        parts.append(tmp_path / f"part-{p}")

    joined = join_parts(parts, tmp_path / "joined")
    assert joined == whole  # same shard files, rows, positions, bytes and checksums: the same cache
    cache = LogitCache.open(tmp_path / "joined", expect_tokenizer=tokenizer)
    cache.verify()
    assert cache.row_ids == [r.row_id for r in rows]
    assert (tmp_path / "part-0" / MANIFEST).is_file()  # parts untouched (linked): a failed join is simply redone
    # Joined again over an earlier result (a rerun after a crash before publishing): the same cache.
    assert join_parts(parts, tmp_path / "joined") == whole
    assert not list(tmp_path.glob(".joined.*"))


def test_overlapping_or_mismatched_parts_are_refused(tmp_path, tokenizer, model):  # noqa: F811
    rows = rows_of(tokenizer, 8)
    write_cache(tmp_path / "a", tokenizer, model, rows[:4], k=5, shard_rows=4)
    write_cache(tmp_path / "b", tokenizer, model, rows[2:6], k=5, shard_rows=4)
    write_cache(tmp_path / "c", tokenizer, model, rows[4:], k=3, shard_rows=4)
    with pytest.raises(ValueError, match="must not overlap"):
        join_parts([tmp_path / "a", tmp_path / "b"], tmp_path / "joined")
    with pytest.raises(ValueError, match="other settings"):
        join_parts([tmp_path / "a", tmp_path / "c"], tmp_path / "joined")
    assert not (tmp_path / "joined").exists()
    assert json.loads((tmp_path / "a" / MANIFEST).read_text())["rows"] == 4
