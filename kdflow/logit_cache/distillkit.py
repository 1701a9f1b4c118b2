"""DistillKit's compressed-parquet logit layout (arcee-ai/DistillKit), rebuilt from its source so that kdflow can
write and read its files: ``kdflow logit-cache-export --format distillkit`` and ``logit-cache-import``
(kdflow/logit_cache/interop.py), and the size comparison in benchmarks/logit_cache_bytes.py. Not a dependency:
DistillKit is not installed, and these lines are what its format is.

Source: arcee-ai/DistillKit at a61c2e7 (2026-03-14):

- distillkit/compression/config.py ``DistributionQuantizationConfig`` (``Layout`` here, its vocabulary ``d`` apart):
  ``logprob_bits`` / ``total_bits``: bytes per token = the log-prob bytes (each residual bin rounded up to bytes,
  the whole rounded up to bytes) + ceil(k · index bits / 8), index bits = ceil(log2(d));
- distillkit/compression/compressor.py ``LogprobCompressor.compress_from_sparse``: sort each position's top-k by
  log-prob, best first; log-probs through ``compress_monotonic_logprobs``, ids through ``pack_to_bytes``;
  ``decompress_to_sparse`` also takes raw ``token_ids`` / ``top_values`` rows;
- distillkit/compression/monotonic_logprobs.py: optional delta encoding along the top-k, then the first ``exact_k``
  values as ``exact_dtype``, a least-squares fit of the rest over t = 0, 1, … (or [0, 1] with ``normalize_t``)
  whose coefficients are stored as ``term_dtype``, and the fit's residual in bins of ``element_bits``-bit integers
  with one ``scale_dtype`` scale each (``quantize_naive``; ``dequantize``);
- distillkit/compression/bitpack.py ``pack_to_bytes``: each value's bits MSB first, concatenated, the position's
  bit stream zero-padded to whole bytes;
- distillkit/sample_logits_vllm.py: its capture writes ``compression_config.yaml`` (the config's
  ``model_dump(mode="json")``) beside ``data_<i>.parquet`` files; vLLM's ``prompt_logprobs`` minus the first
  (empty) position, so entry i of a row is the distribution over ``input_ids[i + 1]`` (n − 1 entries);
- distillkit/sample_common.py ``compressed_logit_schema``: ``input_ids`` list<uint64>, ``compressed_logprobs`` and
  ``bytepacked_indices`` list<list<uint8>> (one inner list per position), pyarrow's default compression (snappy);
- distillkit/pack_logits.py ``_truncate_row``: ``input_ids``, ``labels`` and ``attention_mask`` cut to the number of
  positions before packing; distillkit/trainer.py masks the KD loss with ``labels >= 0``;
- README.md, the "budget pick" quoted here as ``BUDGET``: "around 114 bytes per token" at k = 50 (its formula gives
  114 with 16-bit ids; at Qwen2.5's 151,936 ids take 18 bits and the same configuration costs 127 bytes).

Where kdflow differs, on purpose: the fit is a float64 ``lstsq`` (DistillKit: an SVD pseudo-inverse in float32,
the same fit a hair less exact), and decoding gives float32 (DistillKit decodes into ``exact_dtype``, e.g. bf16).
Writing with ``error_diffusion`` is not supported (reading is: it changes only how residuals were rounded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdflow.config.logit_cache import DISTILLKIT_CONFIG

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
CONFIG_FILE = DISTILLKIT_CONFIG  # beside the data files, as DistillKit's capture writes it
DEFAULT_DELTA_ENCODING = True  # DistillKit's default when a config leaves it out


@dataclass(frozen=True)
class Bin:
    """One ``QuantizationBin``: ``num_elements`` residuals as ``element_bits``-bit integers and one scale."""

    scale_dtype: str
    element_bits: int
    num_elements: int


@dataclass(frozen=True)
class Layout:
    """DistillKit's ``DistributionQuantizationConfig`` without its vocabulary size ``d`` (passed apart, as the cache
    knows it). Defaults: the README's budget pick (delta encoding, error diffusion and residual bins off)."""

    k: int = 50
    exact_k: int = 1
    exact_dtype: str = "bfloat16"
    terms: tuple = (0, 1, "sqrt")
    term_dtype: str = "float32"
    residual_bins: tuple[Bin, ...] = field(default=())
    delta_encoding: bool = False
    error_diffusion: bool = False
    normalize_t: bool = False

    def __post_init__(self):  # DistillKit's check_valid, with the fix in the message
        if not 0 <= self.exact_k <= self.k:
            raise ValueError(f"exact_k={self.exact_k} must lie in 0..k={self.k}")
        if self.exact_k < self.k and not self.terms and not self.residual_bins:
            raise ValueError(
                f"exact_k={self.exact_k} < k={self.k}: give polynomial_terms or residual_bins for the "
                "other values, or set exact_k = k"
            )
        if sum(b.num_elements for b in self.residual_bins) > self.k - self.exact_k:
            raise ValueError(f"residual_bins hold more than k - exact_k = {self.k - self.exact_k} values")
        for name in (self.exact_dtype, self.term_dtype, *(b.scale_dtype for b in self.residual_bins)):
            if name not in DTYPES:
                raise ValueError(f"dtype {name!r}: DistillKit knows {', '.join(DTYPES)}")

    def value_bytes(self) -> int:
        """``logprob_bits() / 8``: each bin rounded up to whole bytes, then the whole."""
        bits = self.exact_k * _bits(self.exact_dtype) + len(self.terms) * _bits(self.term_dtype)
        for b in self.residual_bins:
            bits += (_bits(b.scale_dtype) + b.element_bits * b.num_elements + 7) // 8 * 8
        return (bits + 7) // 8


BUDGET = Layout()  # README "budget pick": k 50, exact_k 1 bf16, terms [0, 1, sqrt] float32


def lossless(k: int) -> Layout:
    """Every log-prob stored as float16: an fp16 cache exactly, and a u8 cache's 1/12-nat steps recovered exactly
    (float16 is within 0.008 nat below 32 nats, and u8 values stop at 21.25). kdflow's default for an export."""
    return Layout(k=k, exact_k=k, exact_dtype="float16", terms=())


def _bits(dtype: str) -> int:
    return torch.finfo(DTYPES[dtype]).bits


def index_bits(vocab_size: int) -> int:
    return math.ceil(math.log2(vocab_size))


def bytes_per_token(layout: Layout, vocab_size: int) -> int:
    """DistillKit's own count (config.py ``total_bits``), for a check against the arrays packed here."""
    return layout.value_bytes() + (layout.k * index_bits(vocab_size) + 7) // 8


# ---- its config file -----------------------------------------------------------------------------------


def config_of(layout: Layout, vocab_size: int) -> dict:
    """``compression_config.yaml`` as DistillKit writes it (``model_dump(mode="json")``)."""
    return {
        "d": vocab_size,
        "k": layout.k,
        "exact_k": layout.exact_k,
        "exact_dtype": layout.exact_dtype,
        "polynomial_terms": list(layout.terms) or None,
        "term_dtype": layout.term_dtype,
        "residual_bins": [
            {"scale_dtype": b.scale_dtype, "element_bits": b.element_bits, "num_elements": b.num_elements}
            for b in layout.residual_bins
        ],
        "delta_encoding": layout.delta_encoding,
        "error_diffusion": layout.error_diffusion,
        "normalize_t": layout.normalize_t,
    }


def layout_of(config: dict, where: str = "the compression config") -> tuple[Layout, int]:
    """A parsed ``compression_config.yaml`` -> (its layout, its vocabulary ``d``), with DistillKit's defaults."""
    missing = [key for key in ("d", "k", "exact_k") if key not in config]
    if missing:
        raise ValueError(
            f"{where}: no {', '.join(missing)}: not a DistillKit DistributionQuantizationConfig "
            "(a legacy LegacyLogitCompressionConfig is not read)"
        )
    try:
        layout = Layout(
            k=int(config["k"]),
            exact_k=int(config["exact_k"]),
            exact_dtype=config.get("exact_dtype", "float32"),
            terms=tuple(config.get("polynomial_terms") or ()),
            term_dtype=config.get("term_dtype", "float32"),
            residual_bins=tuple(
                Bin(b["scale_dtype"], int(b["element_bits"]), int(b["num_elements"]))
                for b in config.get("residual_bins") or ()
            ),
            delta_encoding=bool(config.get("delta_encoding", DEFAULT_DELTA_ENCODING)),
            error_diffusion=bool(config.get("error_diffusion", False)),
            normalize_t=bool(config.get("normalize_t", False)),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    return layout, int(config["d"])


def read_config(path: Path) -> tuple[Layout, int]:
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(
            f"{path}: not YAML ({str(e).splitlines()[0]}); pass the compression_config.yaml DistillKit's capture wrote "
            "beside its parquet files"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{path}: a {type(config).__name__}, not a mapping of settings (d, k, exact_k, ...); pass the "
            "compression_config.yaml DistillKit's capture wrote beside its parquet files"
        )
    return layout_of(config, str(path))


def write_config(path: Path, layout: Layout, vocab_size: int) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config_of(layout, vocab_size)))


# ---- bit packing ---------------------------------------------------------------------------------------


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """(N, m) non-negative ints -> (N, ceil(m · bits / 8)) uint8: each value's ``bits`` bits MSB first, as
    ``pack_to_bytes``."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    stream = ((np.asarray(ids, dtype=np.uint64)[..., None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(len(ids), -1), axis=-1)


def unpack_ids(packed: np.ndarray, bits: int, m: int) -> np.ndarray:
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1)[:, : m * bits].reshape(len(packed), m, bits)
    return (stream.astype(np.int64) << np.arange(bits - 1, -1, -1)).sum(-1)


# ---- log-probs -----------------------------------------------------------------------------------------


def _basis(layout: Layout, n: int) -> torch.Tensor:
    t = torch.linspace(0, 1, n, dtype=torch.float64) if layout.normalize_t else torch.arange(n, dtype=torch.float64)
    return torch.stack([t**term if isinstance(term, int) else getattr(torch, term)(t) for term in layout.terms], -1)


def _bytes_of(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return x.to(DTYPES[dtype]).contiguous().view(torch.uint8).reshape(len(x), -1)


def _quantize(values: torch.Tensor, b: Bin) -> tuple[torch.Tensor, np.ndarray]:
    """``quantize_naive``: one scale per position (max |value| over the bin), rounded to ``scale_dtype``."""
    top = 1.0 if b.element_bits == 1 else 2.0 ** (b.element_bits - 1)
    low, high = (0, 1) if b.element_bits == 1 else (-(2 ** (b.element_bits - 1)), 2 ** (b.element_bits - 1) - 1)
    peak = values.abs().amax(-1, keepdim=True)
    scale = torch.where(peak == 0, torch.ones_like(peak), peak / top).to(DTYPES[b.scale_dtype]).to(values.dtype)
    q = (torch.round(values / scale).clamp(low, high) - low).long()
    return _bytes_of(scale, b.scale_dtype), pack_ids(q.numpy(), b.element_bits)


def _dequantize(packed: np.ndarray, scale: torch.Tensor, b: Bin) -> torch.Tensor:
    q = torch.from_numpy(unpack_ids(packed, b.element_bits, b.num_elements)).double()
    if b.element_bits == 1:
        return (q * 2.0 - 1.0) * scale
    return (q - 2 ** (b.element_bits - 1)) * scale


def encode(ids: np.ndarray, logprobs: np.ndarray, layout: Layout, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) ids and log-probs, any order -> (N, value bytes) and (N, id bytes) uint8: DistillKit's
    ``compressed_logprobs`` and ``bytepacked_indices`` of each position."""
    if layout.error_diffusion:
        raise ValueError("error_diffusion: writing it is not supported; use a layout with error_diffusion: false")
    lp = torch.as_tensor(np.asarray(logprobs), dtype=torch.float32)
    if lp.shape[-1] != layout.k:
        raise ValueError(f"{lp.shape[-1]} log-probs per position, the layout has k={layout.k}")
    order = torch.argsort(lp, dim=-1, descending=True, stable=True)
    lp, ids = lp.gather(-1, order), np.take_along_axis(np.asarray(ids), order.numpy(), -1)
    if layout.delta_encoding:
        lp = torch.cat([lp[:, :1], lp[:, 1:] - lp[:, :-1]], -1)
    chunks = [_bytes_of(lp[:, : layout.exact_k], layout.exact_dtype)]
    rest = lp[:, layout.exact_k :].double()
    if layout.terms:
        basis = _basis(layout, rest.shape[1])
        coeffs = torch.linalg.lstsq(basis, rest.T).solution.T.to(DTYPES[layout.term_dtype])
        chunks.append(_bytes_of(coeffs, layout.term_dtype))
        rest = rest - (basis.to(coeffs.dtype) * coeffs.unsqueeze(-2)).sum(-1).double()
    at = 0
    for b in layout.residual_bins:
        scale, packed = _quantize(rest[:, at : at + b.num_elements], b)
        chunks += [scale, torch.from_numpy(packed)]
        at += b.num_elements
    values = torch.cat(chunks, -1).numpy()
    return values, pack_ids(ids, index_bits(vocab_size))


def decode(
    values: np.ndarray, packed_ids: np.ndarray, layout: Layout, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (N, k) ids and float32 log-probs, as DistillKit's ``decompress_to_sparse`` rebuilds them."""
    values = np.ascontiguousarray(values, dtype=np.uint8)
    n, at = len(values), 0

    def take(nbytes: int) -> torch.Tensor:
        nonlocal at
        part = torch.from_numpy(values[:, at : at + nbytes].copy())  # a fresh buffer: viewed as 2- and 4-byte floats
        at += nbytes
        return part

    exact = take(layout.exact_k * _bits(layout.exact_dtype) // 8).view(DTYPES[layout.exact_dtype]).double()
    approx = layout.k - layout.exact_k
    rest = torch.zeros(n, approx, dtype=torch.float64)
    if layout.terms:
        coeffs = take(len(layout.terms) * _bits(layout.term_dtype) // 8).view(DTYPES[layout.term_dtype])
        rest += (_basis(layout, approx).to(coeffs.dtype) * coeffs.unsqueeze(-2)).sum(-1).double()
    residuals = []
    for b in layout.residual_bins:
        scale = take(_bits(b.scale_dtype) // 8).view(DTYPES[b.scale_dtype]).double()
        residuals.append(_dequantize(take((b.element_bits * b.num_elements + 7) // 8).numpy(), scale, b))
    if residuals:
        joined = torch.cat(residuals, -1)
        rest[:, : joined.shape[1]] += joined
    logprobs = torch.cat([exact, rest], -1)
    if layout.delta_encoding:
        logprobs = torch.cumsum(logprobs, -1)
    ids = unpack_ids(np.asarray(packed_ids, dtype=np.uint8), index_bits(vocab_size), layout.k)
    return torch.from_numpy(ids), logprobs.float()


def write_like_distillkit(path: Path, rows: list, layout: Layout, vocab_size: int) -> int:
    """The rows (``TopK``: the answer positions only, as kdflow stores them) written the way DistillKit's capture
    writes its parquet, without the positions before them; returns the file's bytes
    (benchmarks/logit_cache_bytes.py)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("input_ids", pa.list_(pa.uint64())),
            ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
            ("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
        ]
    )
    columns = {name: [] for name in schema.names}
    for r in rows:
        values, ids = encode(r.ids, r.logprobs, layout, vocab_size)
        columns["input_ids"].append(np.asarray(r.input_ids, dtype=np.uint64))
        columns["compressed_logprobs"].append(list(values))
        columns["bytepacked_indices"].append(list(ids))
    with pq.ParquetWriter(path, schema=schema) as writer:  # pyarrow's defaults, as StreamingParquetWriter's
        writer.write_table(pa.table(columns, schema=schema))
    return path.stat().st_size


# ---- its files -----------------------------------------------------------------------------------------

FILLER_LOGPROB = -30.0  # the other k − 1 entries of a position without a teacher distribution: e^-30 each
TAIL = "kdflow_tail"  # kdflow's own column (the tail mass per position): DistillKit does not read it


def _filler(next_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions without a teacher distribution (the prompt): the sequence's own next token at p = 1, so that a
    DistillKit run that ignores ``labels`` trains them like plain cross-entropy, not towards noise."""
    others = np.tile(np.arange(k - 1), (len(next_ids), 1))
    others = others + (others >= next_ids[:, None])  # k − 1 ids other than the next token
    ids = np.concatenate([next_ids[:, None], others], 1)
    lp = np.full((len(next_ids), k), FILLER_LOGPROB, dtype=np.float32)
    lp[:, 0] = 0.0
    return ids, lp


def table_of(rows: list, layout: Layout, vocab_size: int, with_tail: bool = True):
    """kdflow rows (``TopK``) -> DistillKit's capture columns: n − 1 positions per sequence (entry i over
    ``input_ids[i + 1]``), the cache's answer positions from the cache and the others filled (``_filler``), and
    ``labels`` (-100 on the prompt) so that DistillKit's KD loss skips them."""
    import pyarrow as pa

    from kdflow.logit_cache.columns import list_column, nested_column

    cols = {name: [] for name in ("input_ids", "labels", "compressed_logprobs", "bytepacked_indices", TAIL)}
    for r in rows:
        n, span = len(r.input_ids), slice(r.start, r.start + len(r.ids))
        ids, lp = _filler(np.asarray(r.input_ids[1:], dtype=np.int64), layout.k)
        ids[span], lp[span] = r.ids, r.logprobs
        tail = np.zeros(n - 1, dtype=np.float32)
        tail[span] = r.tail
        values, packed = encode(ids, lp, layout, vocab_size)
        labels = np.full(n, -100, dtype=np.int64)
        labels[r.start + 1 :] = r.input_ids[r.start + 1 :]
        for name, value in (
            ("input_ids", np.asarray(r.input_ids, dtype=np.uint64)),
            ("labels", labels),
            ("compressed_logprobs", values),
            ("bytepacked_indices", packed),
            (TAIL, tail),
        ):
            cols[name].append(value)
    types = {"input_ids": pa.uint64(), "labels": pa.int64(), TAIL: pa.float32()}
    return pa.table(
        {
            name: (nested_column(v, pa.uint8()) if name not in types else list_column(v, types[name]))
            for name, v in cols.items()
            if with_tail or name != TAIL
        }
    )


def rows_of(batch, layout: Layout, vocab_size: int, file, first_row: int, spans: list | None = None):
    """DistillKit's columns -> ``Imported`` rows. Its compressed columns (or the raw ``token_ids`` / ``top_values``
    its compressor also reads). The stored span: ``spans`` (kdflow's export metadata) if given; else from ``labels``
    (from the position before the first label), else every position. The top-k keep the file's order: DistillKit
    sorts them by the teacher's log-probs before compressing, and a fitted value may cross its neighbour."""
    from kdflow.logit_cache.columns import Imported, LogitFileError, read_lists, read_nested, where

    names = batch.schema.names
    raw = "token_ids" in names and "top_values" in names
    pair = ("token_ids", "top_values") if raw else ("bytepacked_indices", "compressed_logprobs")
    if "input_ids" not in names or not all(p in names for p in pair):
        raise LogitFileError(
            f"{file}: DistillKit's columns are input_ids with compressed_logprobs and "
            f"bytepacked_indices (or token_ids and top_values); found {', '.join(names)}"
        )
    col = {name: batch.column(name) for name in names}
    input_ids = read_lists(col["input_ids"], file, first_row, "input_ids", np.int64)
    first = read_nested(col[pair[0]], file, first_row, pair[0], np.int64 if raw else np.uint8)
    second = read_nested(col[pair[1]], file, first_row, pair[1], np.float32 if raw else np.uint8)
    labels = read_lists(col["labels"], file, first_row, "labels", np.int64) if "labels" in col else None
    tails = read_lists(col[TAIL], file, first_row, TAIL, np.float32) if TAIL in col else None
    widths = (layout.k, layout.k) if raw else ((layout.k * index_bits(vocab_size) + 7) // 8, layout.value_bytes())
    for i, (tokens, a, b) in enumerate(zip(input_ids, first, second)):
        row, n = first_row + i, len(tokens)
        if len(a) != len(b) or (tails is not None and len(tails[i]) != len(a)):
            extra = "" if tails is None else f", {TAIL} {len(tails[i])}"
            raise LogitFileError(
                f"{where(file, row)}: columns of unequal length ({pair[0]} {len(a)} positions, "
                f"{pair[1]} {len(b)}{extra}); each holds one entry per position: re-export the row"
            )
        if len(a) > n:
            raise LogitFileError(
                f"{where(file, row)}: {len(a)} positions for {n} input_ids; a sequence of n tokens "
                "has at most n logit positions: were input_ids truncated?"
            )
        for name, got, want in ((pair[0], a.shape[1], widths[0]), (pair[1], b.shape[1], widths[1])):
            if len(a) and got != want:
                raise LogitFileError(
                    f"{where(file, row)}: {name} has {got} {'entries' if raw else 'bytes'} per position, "
                    f"the compression config (k={layout.k}, d={vocab_size}) says {want}: wrong "
                    "compression_config.yaml for this file, or a damaged row"
                )
        ids, lp = (a, b) if raw else (t.numpy() for t in decode(b, a, layout, vocab_size))
        positions = min(len(a), n - 1)  # a position past the last token (n positions) has nothing to predict
        start, length = _span_of(spans[i] if spans else None, None if labels is None else labels[i], positions)
        if spans and labels is not None and (marked := _span_of(None, labels[i], positions)[0]) != start:
            raise LogitFileError(
                f"{where(file, row)}: the kdflow metadata's span starts at position {start}, the labels at {marked}: "
                "the rows or labels were edited after the export; export the cache again"
            )
        keep = slice(start, start + length)
        yield Imported(row, None, tokens, start, ids[keep], lp[keep], None if tails is None else tails[i][keep])


def _span_of(span, labels, positions: int) -> tuple[int, int]:
    if span is not None:
        return int(span[0]), int(span[1])
    if labels is not None:
        trained = np.flatnonzero(labels >= 0)
        start = max(int(trained[0]) - 1, 0) if len(trained) else positions
        return start, positions - start
    return 0, positions
