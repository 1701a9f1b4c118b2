"""axolotl's KD columns: a tokenized dataset whose rows carry the teacher's top-k at every position, as axolotl's KD
trainer reads them. Written and read by kdflow/logit_cache/interop.py.

What axolotl reads (axolotl-ai-cloud/axolotl, src/axolotl/integrations/kd/, main at 067b021 of 2026-07-24 and its
README's "Target alignment" section):

- trainer.py ``AxolotlKDTrainer.compute_loss``: ``input_ids``, ``attention_mask``, ``labels``, and ``target_token_ids``,
  ``target_logprobs``, ``target_mask`` (added to the signature columns, so the trainer keeps them; other columns
  are dropped with ``remove_unused_columns``, the default);
- chat_template.py ``ChatTemplateStrategyWithKD.transform_logprobs``: one target row per input token, each of
  top-k entries, positions without a teacher distribution padded with ``target_mask`` 0; the top-k renormalised
  to sum 1 (its ``kd_normalize_topk``), so no tail mass survives in its own data;
- collator.py ``DataCollatorForKD``: pads ``target_logprobs`` with -1e9 (finite: no NaN in the loss),
  ``target_token_ids`` with 0 and ``target_mask`` with 0;
- kernels/liger.py: the student's hidden state j is scored against target row j, and the labels are shifted by one
  (``true_labels[:, 1:]``): row j is the distribution over ``input_ids[j + 1]`` and the last row is padding — the
  README states it as "target_token_ids[j] / target_logprobs[j] -> distribution over input_ids[j + 1],
  target_mask[j] -> 0 where labels[j + 1] == -100". That is kdflow's logit position j.

kdflow's exports add ``kdflow_tail`` (per position, log of the mass outside the top-k), which axolotl drops as an
unused column and kdflow's import reads back, so that a round trip keeps the tail exactly; a file without it gets
the tail ``log(1 − Σ top-k p)``, which is the floor (e^-30) for data whose top-k was renormalised.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from kdflow.config.logit_cache import FORMAT_COLUMNS
from kdflow.logit_cache.columns import (
    Imported,
    LogitFileError,
    list_column,
    nested_column,
    read_lists,
    read_nested,
    where,
)
from kdflow.logit_cache.format import TopK

PAD_LOGPROB = -1e9  # collator.py's padding value for target_logprobs
IGNORE_INDEX = -100
TAIL = "kdflow_tail"
(REQUIRED,) = FORMAT_COLUMNS["axolotl"]


def table_of(rows: list[TopK], k: int, with_tail: bool = True) -> pa.Table:
    """kdflow rows -> axolotl's columns, one target row per token (padding where the cache has no distribution)."""
    cols = {
        name: []
        for name in (
            "input_ids",
            "attention_mask",
            "labels",
            "target_token_ids",
            "target_logprobs",
            "target_mask",
            TAIL,
        )
    }
    for r in rows:
        n, span = len(r.input_ids), slice(r.start, r.start + len(r.ids))
        ids, lp = np.tile(np.arange(k), (n, 1)), np.full((n, k), PAD_LOGPROB, dtype=np.float32)
        mask, tail = np.zeros((n, k), dtype=np.int8), np.zeros(n, dtype=np.float32)
        ids[span], lp[span], mask[span], tail[span] = r.ids, r.logprobs, 1, r.tail
        labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
        labels[r.start + 1 :] = r.input_ids[r.start + 1 :]
        for name, value in (
            ("input_ids", r.input_ids),
            ("attention_mask", np.ones(n, dtype=np.int8)),
            ("labels", labels),
            ("target_token_ids", ids),
            ("target_logprobs", lp),
            ("target_mask", mask),
            (TAIL, tail),
        ):
            cols[name].append(value)
    types = {"input_ids": pa.int32(), "attention_mask": pa.int8(), "labels": pa.int32(), TAIL: pa.float32()}
    nested = {"target_token_ids": pa.int32(), "target_logprobs": pa.float32(), "target_mask": pa.int8()}
    arrays = {
        name: (nested_column(v, nested[name]) if name in nested else list_column(v, types[name]))
        for name, v in cols.items()
        if with_tail or name != TAIL
    }
    return pa.table(arrays)


def rows_of(batch: pa.RecordBatch, file, first_row: int) -> Iterator[Imported]:
    """axolotl's columns -> ``Imported`` rows: the positions whose ``target_mask`` is 1, which must be one span."""
    missing = [name for name in REQUIRED if name not in batch.schema.names]
    if missing:
        raise LogitFileError(
            f"{file}: no column {', '.join(missing)}; axolotl's KD columns are {', '.join(REQUIRED)} "
            f"(tokenized, one target row per token); found {', '.join(batch.schema.names)}"
        )
    col = {name: batch.column(name) for name in batch.schema.names}
    input_ids = read_lists(col["input_ids"], file, first_row, "input_ids", np.int64)
    ids = read_nested(col["target_token_ids"], file, first_row, "target_token_ids", np.int64)
    lps = read_nested(col["target_logprobs"], file, first_row, "target_logprobs", np.float32)
    masks = read_nested(col["target_mask"], file, first_row, "target_mask", np.int8)
    tails = read_lists(col[TAIL], file, first_row, TAIL, np.float32) if TAIL in col else [None] * len(ids)
    for i, (tokens, t_ids, lp, mask, tail) in enumerate(zip(input_ids, ids, lps, masks, tails)):
        row = first_row + i
        lengths = {
            "input_ids": len(tokens),
            "target_token_ids": len(t_ids),
            "target_logprobs": len(lp),
            "target_mask": len(mask),
            **({} if tail is None else {TAIL: len(tail)}),
        }
        if len(set(lengths.values())) > 1:
            sizes = ", ".join(f"{name} {n}" for name, n in lengths.items())
            raise LogitFileError(
                f"{where(file, row)}: columns of unequal length ({sizes}); "
                "axolotl's KD columns hold one target row per input token: re-export the row"
            )
        if not (t_ids.shape == lp.shape == mask.shape):
            raise LogitFileError(
                f"{where(file, row)}: target_token_ids {t_ids.shape[1]}, target_logprobs {lp.shape[1]} "
                f"and target_mask {mask.shape[1]} entries per position differ; they must match"
            )
        start, length = _span(mask, file, row)
        span = slice(start, start + length)
        order = np.argsort(-lp[span], axis=-1, kind="stable")  # best first, as a cache stores them
        yield Imported(
            row,
            None,
            tokens,
            start,
            np.take_along_axis(t_ids[span], order, -1),
            np.take_along_axis(lp[span], order, -1),
            None if tail is None else tail[span],
        )


def _span(mask: np.ndarray, file, row: int) -> tuple[int, int]:
    """(first position, count) of the positions with a teacher distribution (``target_mask`` all 1)."""
    kept, partial = mask.all(-1), mask.any(-1) & ~mask.all(-1)
    if partial.any():
        j = int(np.flatnonzero(partial)[0])
        raise LogitFileError(
            f"{where(file, row, j)}: target_mask keeps {int(mask[j].sum())} of {mask.shape[1]} entries; "
            "a kdflow cache holds exactly k per position: drop the short positions' mask or pad them"
        )
    at = np.flatnonzero(kept)
    if not len(at):
        raise LogitFileError(
            f"{where(file, row)}: target_mask is 0 everywhere: no teacher distribution to import (drop the row)"
        )
    if at[-1] - at[0] + 1 != len(at):
        gap = int(at[np.flatnonzero(np.diff(at) > 1)[0]] + 1)
        raise LogitFileError(
            f"{where(file, row, gap)}: target_mask has a gap; kdflow stores one span of positions per "
            "sequence (the answer): split the row or fill the gap"
        )
    if at[-1] == len(mask) - 1:
        raise LogitFileError(
            f"{where(file, row, int(at[-1]))}: the last position is kept, but row j is the "
            "distribution over input_ids[j + 1] and there is no token after the last: the file is "
            "aligned one position off (row j over input_ids[j]?); shift it by one"
        )
    return int(at[0]), len(at)
