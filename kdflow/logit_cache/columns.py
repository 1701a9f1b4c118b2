"""Arrow list columns to and from numpy, for the logit datasets of other tools (kdflow/logit_cache/interop.py), and
the error a bad one raises: it names the file, the row (and position) and the fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa


class LogitFileError(ValueError):
    """A logit dataset that cannot be imported (or a cache that cannot be exported): file, row, what, and the fix."""


def where(file: Path | str, row: int | None = None, position: int | None = None) -> str:
    at = "" if row is None else f": row {row}" + ("" if position is None else f", position {position}")
    return f"{file}{at}"


@dataclass
class Imported:
    """One sequence read from another tool's file, before it is checked and stored: ``ids`` / ``logprobs`` (L, k)
    for logit positions ``start … start + L − 1`` (position t predicts ``input_ids[t + 1]``); ``tail`` (L,) when the
    file carries it (kdflow's own exports), else None."""

    row: int
    row_id: str | None
    input_ids: np.ndarray
    start: int
    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray | None


# p = exp(log-prob) is at most 1, and a position's top-k sums to at most 1. Rounding (fp16, bf16, u8 steps, a
# producer's renormalisation) stays well inside these margins; a column of logits or of probabilities does not.
LOGPROB_MAX, MASS_MAX = 0.01, 1.05
# The top-k and a stated tail must together make about 1: below 0.95 the tail leaves mass nowhere (u8's 1/24-nat steps
# move a sum by at most 4 %), and a student would learn a distribution of less than one.
MASS_MIN = 0.95


def distribution_problem(
    ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray | None = None
) -> tuple[int, str] | None:
    """The first position of ``ids`` / ``logprobs`` (L, k; finite) whose top-k is not one distribution, and why;
    None when every position is one. A repeated id would count its token twice, a log-prob above 0 or a top-k mass
    above 1 is not a probability: stored, either trains a student towards what no teacher said. ``tail`` (L; finite):
    the file's log of the mass outside the top-k, where it has one; with the top-k it must make about 1 (0.95-1.05)."""
    ordered = np.sort(ids, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(1)
    above = (logprobs > LOGPROB_MAX).any(1)
    mass = np.exp(logprobs.astype(np.float64)).sum(1)
    over = mass > MASS_MAX
    total = mass + (0.0 if tail is None else np.exp(np.asarray(tail, dtype=np.float64)))
    tail_over = np.zeros_like(over) if tail is None else (np.asarray(tail) > LOGPROB_MAX) | (total > MASS_MAX)
    tail_under = np.zeros_like(over) if tail is None else total < MASS_MIN
    bad = repeated | above | over | tail_over | tail_under
    if not bad.any():
        return None
    j = int(np.flatnonzero(bad)[0])
    if repeated[j]:
        twice = int(ordered[j][1:][ordered[j][1:] == ordered[j][:-1]][0])
        return j, f"top-k id {twice} appears twice; a position's top-k names k different tokens: re-export the row"
    if above[j]:
        return j, (
            f"log-prob {float(logprobs[j].max()):g} is above 0 (a probability above 1): the column holds logits or "
            "something else, not log-probs; write log_softmax values"
        )
    if over[j]:
        return j, (
            f"the top-k probabilities sum to {mass[j]:.3f}, more than 1: not one distribution (logits, or values of "
            "another temperature?); write log_softmax values"
        )
    return j, (
        f"the tail (kdflow_tail {float(tail[j]):g}) puts {np.exp(float(tail[j])):.3f} of the mass outside the top-k, "
        f"which with the top-k's {mass[j]:.3f} makes {total[j]:.3f}, "
        f"{'more than 1' if total[j] > MASS_MAX else 'well under 1'}: write log(1 - the top-k's sum), or drop the "
        "column (the import then computes it)"
    )


def list_column(values: list[np.ndarray], item: pa.DataType) -> pa.Array:
    """list<item> from one 1-D array per row."""
    offsets = np.cumsum([0, *(len(v) for v in values)]).astype(np.int32)
    flat = np.concatenate(values) if values else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=item))


def nested_column(values: list[np.ndarray], item: pa.DataType) -> pa.Array:
    """list<list<item>> from one (n_i, width) array per row: one inner list per position."""
    inner = list_column([row for v in values for row in v], item)
    offsets = np.cumsum([0, *(len(v) for v in values)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def _lengths(column: pa.Array, file, first_row: int, name: str) -> np.ndarray:
    if column.null_count:
        row = first_row + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise LogitFileError(f"{where(file, row)}: {name} is null; every row needs it (drop the row or fill it)")
    return column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)


def read_lists(column: pa.Array, file, first_row: int, name: str, dtype) -> list[np.ndarray]:
    """list<…> -> one 1-D array per row."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    bounds = np.cumsum([0, *_lengths(column, file, first_row, name)])
    flat = _cast(column.flatten().to_numpy(zero_copy_only=False), dtype, file, name)
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _cast(values: np.ndarray, dtype, file, name: str) -> np.ndarray:
    """``values`` as ``dtype``; token ids written as fractions (16.5) are an error, not truncated to another token."""
    if np.issubdtype(dtype, np.integer) and np.issubdtype(values.dtype, np.floating):
        bad = ~np.isfinite(values) | (values != np.floor(values))
        if bad.any():
            raise LogitFileError(
                f"{file}: {name} holds {values[bad][0]:g}, not a whole number: token ids are integers; write the "
                "column as integers (the file's ids may have passed through a float column)"
            )
    return values.astype(dtype)


def read_nested(column: pa.Array, file, first_row: int, name: str, dtype) -> list[np.ndarray]:
    """list<list<…>> -> one (positions, width) array per row; a row whose inner lists differ in length is an error
    naming the first position that differs."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    outer = _lengths(column, file, first_row, name)
    inner_lists = column.flatten()
    inner = _lengths(inner_lists, file, first_row, name)
    flat = _cast(inner_lists.flatten().to_numpy(zero_copy_only=False), dtype, file, name)
    rows, at, pos = [], 0, 0
    for i, n in enumerate(outer):
        widths = inner[pos : pos + n]
        if n and (widths != widths[0]).any():
            j = int(np.flatnonzero(widths != widths[0])[0])
            raise LogitFileError(
                f"{where(file, first_row + i, j)}: {name} has {widths[j]} entries where position 0 "
                f"has {widths[0]}; every position of a row needs the same top-k"
            )
        width = int(widths[0]) if n else 0
        rows.append(flat[at : at + n * width].reshape(int(n), width))
        at, pos = at + n * width, pos + n
    return rows
