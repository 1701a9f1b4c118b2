"""DistillKit's logit-cache layout, which benchmarks/logit_cache_bytes.py sizes kdflow's cache against. The layout
itself lives in the library, kdflow/logit_cache/distillkit.py (rebuilt from DistillKit's source, with the
sources cited there), because ``kdflow logit-cache-export`` / ``logit-cache-import`` write and read it too."""

from kdflow.logit_cache.distillkit import (
    BUDGET,
    Layout,
    bytes_per_token,
    decode,
    encode,
    index_bits,
    pack_ids,
    unpack_ids,
    write_like_distillkit,
)

__all__ = [
    "BUDGET",
    "Layout",
    "bytes_per_token",
    "decode",
    "encode",
    "index_bits",
    "pack_ids",
    "unpack_ids",
    "write_like_distillkit",
]
