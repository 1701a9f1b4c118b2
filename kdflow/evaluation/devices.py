"""What a model would cost where it will run: a roofline lower bound on the latency of one generated token on a few
named devices, from the token's FLOPs and bytes (``traffic.py``) and each device's peak compute and memory bandwidth.

    t ≥ max(FLOPs / peak FLOP/s, bytes / bandwidth)          (Williams, Waterman & Patterson 2009, "Roofline")

A lower bound, not a prediction: it assumes every weight streams from DRAM at the peak bandwidth and every FLOP runs
at the peak rate. Real kernels get less (kernel launches, Python, caches): the measured latency beside it says how far
this implementation is from the hardware's limit. A model small enough to stay in on-chip cache can beat the DRAM
bound — the demo's 85K-parameter students (~0.3 MB) do on a CPU — so for them the bound is only a scale.

Where a device publishes no peak for the model's compute dtype, the compute term is left out (the bound is then the
memory term alone, still a lower bound). Vendors' peaks are optimistic (boost clocks, all units busy), which keeps the
bound a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROOFLINE_FORMULA = (
    "latency/token ≥ max(FLOPs/token ÷ peak FLOP/s at the model's compute dtype, bytes/token ÷ memory "
    "bandwidth), batch 1"
)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    example: str  # the device whose public figures stand for its class
    bandwidth_bytes_s: float
    bandwidth_source: str
    peak_flops: dict[str, float] = field(default_factory=dict)  # compute dtype -> dense FLOP/s (OP/s for int8)
    peak_source: str = ""


# Dense peaks: vendors quote int8 and 16-bit tensor-core rates "with sparsity" (2:4 structured), twice the dense rate.
DEVICES: tuple[DeviceProfile, ...] = (
    DeviceProfile(
        "phone-soc",
        "Qualcomm Snapdragon 8 Gen 3 (2024 flagship phones)",
        76.8e9,
        "Qualcomm's Snapdragon 8 Gen 3 specification: LPDDR5x up to 4800 MHz, i.e. 9600 MT/s; × a 64-bit bus "
        "(4 × 16-bit channels, usual for phone SoCs; Qualcomm does not state it) / 8 = 76.8 GB/s",
        {"int8": 45e12},
        "Hexagon NPU 45 TOPS int8 as reported by third parties (e.g. runlocalai.co's hardware page); "
        "Qualcomm publishes no TOPS or FP32 figure for this chip, so fp32 has no compute term",
    ),
    DeviceProfile(
        "laptop-cpu",
        "Intel Core Ultra 7 155H (Meteor Lake, 6 P + 8 E + 2 LP-E cores)",
        120e9,
        "Intel ARK, Core Ultra 7 155H: max memory bandwidth 120 GB/s (LPDDR5x-7467)",
        {"fp32": 1.41e12},
        "derived from Intel ARK clocks: 6 P-cores × 32 FP32 FLOP/cycle (two 256-bit FMA units) × "
        "4.8 GHz + 8 E-cores × 16 FLOP/cycle × 3.8 GHz = 1.41 TFLOP/s (max turbo on every core: "
        "optimistic); Intel publishes no CPU FLOP/s and no CPU int8 rate (its NPU: 11 TOPS)",
    ),
    DeviceProfile(
        "edge-gpu",
        "NVIDIA Jetson AGX Orin 64GB",
        204.8e9,
        "NVIDIA Jetson AGX Orin Series data sheet: 256-bit LPDDR5, 204.8 GB/s",
        {"fp32": 5.3e12, "int8": 137.5e12},
        "NVIDIA Jetson AGX Orin data sheet: 2048 CUDA cores at up to 1.3 GHz (× 2 FLOP per FMA = 5.3 TFLOP/s fp32); "
        "275 TOPS int8 with sparsity (GPU + 2 DLAs) / 2 = 137.5 dense",
    ),
    DeviceProfile(
        "datacenter-gpu-h100",
        "NVIDIA H100 SXM5 80GB",
        3.35e12,
        "NVIDIA H100 Tensor Core GPU data sheet: GPU memory bandwidth 3.35 TB/s (HBM3)",
        {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12, "int8": 1979e12},
        "NVIDIA H100 data sheet (SXM): FP32 67 TFLOPS; BF16/FP16 tensor 1,979 and INT8 tensor 3,958 with sparsity, "
        "halved for dense",
    ),
    DeviceProfile(
        "datacenter-gpu-h200",
        "NVIDIA H200 SXM 141GB",
        4.8e12,
        "NVIDIA H200 Tensor Core GPU data sheet: GPU memory bandwidth 4.8 TB/s (HBM3e)",
        {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12, "int8": 1979e12},
        "NVIDIA H200 data sheet (SXM): the same compute as H100 SXM (FP32 67 TFLOPS; BF16/FP16 1,979 and INT8 3,958 "
        "TOPS with sparsity, halved for dense)",
    ),
)


def roofline_seconds(flops: float | None, memory_bytes: float, dtype: str, device: DeviceProfile) -> dict:
    """The lower bound on one token's latency on ``device``, and which term sets it ("memory" or "compute")."""
    memory_s = memory_bytes / device.bandwidth_bytes_s
    peak = device.peak_flops.get(dtype)
    compute_s = flops / peak if flops is not None and peak else None
    bound = "compute" if compute_s is not None and compute_s > memory_s else "memory"
    return {"seconds": max(memory_s, compute_s or 0.0), "bound": bound, "compute_term": compute_s is not None}


def roofline(figures: dict, devices: tuple[DeviceProfile, ...] = DEVICES) -> dict[str, dict]:
    """Per device, for one model's deployment figures (``flops_per_token``, ``memory_bytes_per_token``,
    ``compute_dtype``): {"us_per_token", "bound", "compute_term"}; empty when the traffic was not measured."""
    if figures.get("memory_bytes_per_token") is None:
        return {}
    out = {}
    for d in devices:
        r = roofline_seconds(
            figures.get("flops_per_token"), figures["memory_bytes_per_token"], figures.get("compute_dtype", "fp32"), d
        )
        out[d.name] = {
            "us_per_token": float(f"{r['seconds'] * 1e6:.4g}"),
            "bound": r["bound"],
            "compute_term": r["compute_term"],
        }
    return out


def device_table() -> list[dict]:
    """The profiles as plain data, for the report (every number with its source)."""
    return [
        {
            "name": d.name,
            "example": d.example,
            "bandwidth_bytes_s": d.bandwidth_bytes_s,
            "bandwidth_source": d.bandwidth_source,
            "peak_flops": dict(d.peak_flops),
            "peak_source": d.peak_source,
        }
        for d in DEVICES
    ]
