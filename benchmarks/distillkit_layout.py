"""DistillKit's logit-cache layout, rebuilt here to size it on the same captured top-k as kdflow's cache
(benchmarks/logit_cache_bytes.py). Not a dependency: DistillKit is not installed, and these few lines are what
its format is.

Source: arcee-ai/DistillKit at a61c2e7 (2026-03-14):

- distillkit/compression/compressor.py ``LogprobCompressor.compress_from_sparse``: sort each position's top-k by
  log-prob, best first; log-probs through ``compress_monotonic_logprobs``, token ids through ``pack_to_bytes`` at
  ``ceil(log2(d))`` bits each (d: the vocabulary);
- distillkit/compression/monotonic_logprobs.py: the first ``exact_k`` values stored as ``exact_dtype``, the
  remaining ``k - exact_k`` approximated by a least-squares fit over t = 0, 1, … (``normalize_t`` false) whose
  coefficients are stored as ``term_dtype`` (no residual bins in the configuration below);
- distillkit/compression/bitpack.py ``pack_to_bytes``: each id's bits MSB first, concatenated, the position's
  bit stream zero-padded to whole bytes;
- distillkit/compression/config.py ``total_bits``: bytes per token = (logprob bits rounded up to bytes) +
  ceil(k · index bits / 8), which is what its own evaluation (test_compression.py) reports;
- README.md, the "budget pick" quoted here as ``BUDGET``: "around 114 bytes per token" at k = 50. Its formula
  gives 114 with 16-bit ids (a vocabulary of at most 65,536); at Qwen2.5's 151,936 ids take 18 bits and the
  same configuration costs 2 + 12 + 113 = 127 bytes per token.
- distillkit/sample_common.py ``compressed_logit_schema`` and ``StreamingParquetWriter``: what its capture
  writes, one parquet row per sequence: ``input_ids`` list<uint64>, ``compressed_logprobs`` and
  ``bytepacked_indices`` list<list<uint8>> (one inner list per position), pyarrow's default compression (snappy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Layout:
    """The fields of DistillKit's ``DistributionQuantizationConfig`` this layout uses (delta encoding, error
    diffusion and residual bins off, as in the budget pick)."""

    k: int = 50
    exact_k: int = 1
    exact_dtype: torch.dtype = torch.bfloat16
    terms: tuple = (0, 1, "sqrt")
    term_dtype: torch.dtype = torch.float32

    def value_bytes(self) -> int:
        bits = self.exact_k * torch.finfo(self.exact_dtype).bits + len(self.terms) * torch.finfo(self.term_dtype).bits
        return (bits + 7) // 8


BUDGET = Layout()  # README "budget pick": k 50, exact_k 1 bf16, terms [0, 1, sqrt] float32


def index_bits(vocab_size: int) -> int:
    return math.ceil(math.log2(vocab_size))


def bytes_per_token(layout: Layout, vocab_size: int) -> int:
    """DistillKit's own count (config.py ``total_bits``), for a check against the arrays packed here."""
    return layout.value_bytes() + (layout.k * index_bits(vocab_size) + 7) // 8


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """(N, k) ids -> (N, ceil(k · bits / 8)) uint8: each id's ``bits`` bits MSB first, as ``pack_to_bytes``."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    stream = ((np.asarray(ids, dtype=np.uint64)[..., None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(len(ids), -1), axis=-1)


def unpack_ids(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    stream = np.unpackbits(packed, axis=-1)[:, : k * bits].reshape(len(packed), k, bits).astype(np.int64)
    return (stream << np.arange(bits - 1, -1, -1)).sum(-1)


def _basis(layout: Layout, n: int) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float64)
    return torch.stack([t**term if isinstance(term, int) else getattr(torch, term)(t) for term in layout.terms], -1)


def encode(ids: np.ndarray, logprobs: np.ndarray, layout: Layout, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) ids and log-probs, any order -> (N, value bytes) and (N, id bytes) uint8: DistillKit's
    ``compressed_logprobs`` and ``bytepacked_indices`` of each position."""
    lp = torch.as_tensor(logprobs, dtype=torch.float32)
    order = torch.argsort(lp, dim=-1, descending=True)
    lp, ids = lp.gather(-1, order), np.take_along_axis(np.asarray(ids), order.numpy(), -1)
    exact = lp[:, : layout.exact_k].to(layout.exact_dtype)
    # DistillKit fits through an SVD pseudo-inverse in float32; lstsq in float64 is the same fit, a hair closer.
    rest = lp[:, layout.exact_k : layout.k].double()
    coeffs = torch.linalg.lstsq(_basis(layout, rest.shape[1]), rest.T).solution.T.to(layout.term_dtype)
    values = torch.cat([exact.contiguous().view(torch.uint8), coeffs.contiguous().view(torch.uint8)], -1)
    return values.numpy(), pack_ids(ids, index_bits(vocab_size))


def decode(values: np.ndarray, packed_ids: np.ndarray, layout: Layout, vocab_size: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (N, k) ids and log-probs, as DistillKit's ``decompress_to_sparse`` rebuilds them."""
    width = torch.finfo(layout.exact_dtype).bits // 8 * layout.exact_k
    # copy(): a fresh buffer per field, so that its bytes can be viewed as 2- and 4-byte floats
    exact = torch.from_numpy(values[:, :width].copy()).view(layout.exact_dtype).float()
    coeffs = torch.from_numpy(values[:, width:].copy()).view(layout.term_dtype).double()
    fit = (coeffs @ _basis(layout, layout.k - layout.exact_k).T).float()
    return torch.from_numpy(unpack_ids(packed_ids, index_bits(vocab_size), layout.k)), torch.cat([exact, fit], -1)


def write_like_distillkit(path: Path, rows: list, layout: Layout, vocab_size: int) -> int:
    """The rows (``TopK``: the answer positions only, as kdflow stores them) written the way DistillKit's capture
    writes its parquet; returns the file's bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("input_ids", pa.list_(pa.uint64())),
                        ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                        ("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])
    columns = {name: [] for name in schema.names}
    for r in rows:
        values, ids = encode(r.ids, r.logprobs, layout, vocab_size)
        columns["input_ids"].append(np.asarray(r.input_ids, dtype=np.uint64))
        columns["compressed_logprobs"].append(list(values))
        columns["bytepacked_indices"].append(list(ids))
    with pq.ParquetWriter(path, schema=schema) as writer:  # pyarrow's defaults, as StreamingParquetWriter's
        writer.write_table(pa.table(columns, schema=schema))
    return path.stat().st_size
