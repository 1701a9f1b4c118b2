"""Energy per generated token: measured from the machine's energy counters where it has them, otherwise estimated from
a stated power figure — and always labelled which (``energy_source: measured | estimated``), never mixed silently.

Counters are read through zeus (ML.ENERGY, ``pip install zeus``): one maintained library for both kinds this project
meets — Intel/AMD RAPL under ``/sys/class/powercap`` (package and DRAM zones, counter wrap-around tracked) and NVIDIA's
NVML total-energy counter (Volta and later) — that reads counters only and never substitutes an estimate of its own.
codecarbon was the alternative: it falls back to TDP-based estimates inside the same figure (exactly the silent
mixing we must avoid), is about CO₂ rather than joules, and pulls ~10 packages; bare pynvml covers GPUs only.

A counter measures the whole device (a CPU package, a GPU), other processes included: on a shared machine a measured
figure is an upper bound for the model alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

POWERCAP = Path("/sys/class/powercap")
ENERGY_FORMULA = (
    "measured = (counter after − counter before) ÷ tokens over each timed batch-1 run, "
    "median of the runs; estimated = stated power (W) × measured latency per token (s)"
)


class Unavailable(Exception):
    """No energy counter can be read here; the message says why (the estimate is used instead)."""


@dataclass
class Counter:
    what: str  # which counter, for the report: "RAPL package-0 + dram (zeus), /sys/class/powercap"
    read_joules: Callable[[], float]  # monotonic: energy since some fixed point, in joules


def _zeus():
    import importlib.util

    if importlib.util.find_spec("zeus") is None:
        raise Unavailable("zeus is not installed (pip install zeus==0.16.0)")


def rapl_counter(powercap: Path = POWERCAP) -> Counter:
    """The CPU packages' RAPL energy (each package plus its DRAM zone where there is one), through zeus."""
    _zeus()
    from zeus.device.cpu.rapl import RAPLCPU
    from zeus.exception import ZeusBaseError

    root = Path(powercap) / "intel-rapl"
    packages = (
        sorted(int(p.name.split(":")[1]) for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        if root.is_dir()
        else []
    )
    if not packages:
        raise Unavailable(
            f"no RAPL zones under {root} (a VM, a container without /sys/class/powercap, or a CPU without RAPL)"
        )
    try:
        cpus = [RAPLCPU(i, str(root)) for i in packages]
        for cpu in cpus:  # a counter readable at start is readable later (root-only files fail here)
            cpu.get_total_energy_consumption()
    except (ZeusBaseError, OSError) as e:
        raise Unavailable(
            f"RAPL counters under {root} are not readable ({type(e).__name__}: {e}); reading "
            "energy_uj needs root on most kernels"
        ) from None

    def read() -> float:
        total_mj = 0.0
        for cpu in cpus:
            m = cpu.get_total_energy_consumption()
            total_mj += m.cpu_mj + (m.dram_mj or 0.0)
        return total_mj / 1000.0

    zones = ", ".join(
        f"package-{i}" + (" + dram" if c.supports_get_dram_energy_consumption() else "") for i, c in zip(packages, cpus)
    )
    return Counter(f"RAPL {zones} (zeus), {root}", read)


def nvml_counter(gpu_index: int) -> Counter:
    """The GPU's NVML total-energy counter, through zeus."""
    _zeus()
    from zeus.device.gpu import get_gpus
    from zeus.exception import ZeusBaseError

    try:
        gpus = get_gpus()
        if not gpus.supports_get_total_energy_consumption(gpu_index):
            raise Unavailable(f"GPU {gpu_index} has no NVML total-energy counter (older than Volta)")
    except (ZeusBaseError, ValueError) as e:
        raise Unavailable(f"NVML not usable for GPU {gpu_index} ({type(e).__name__}: {e})") from None
    return Counter(
        f"NVML total energy, GPU {gpu_index} (zeus)", lambda: gpus.get_total_energy_consumption(gpu_index) / 1000.0
    )


def counter_for(device_type: str, gpu_index: int = 0, powercap: Path = POWERCAP) -> tuple[Counter | None, str | None]:
    """The counter of the device the models run on ("cuda" or "cpu"), or (None, why there is none)."""
    try:
        return (nvml_counter(gpu_index) if device_type == "cuda" else rapl_counter(powercap)), None
    except Unavailable as e:
        return None, str(e)


def energy_per_token(figures: dict, watts: float, source: str) -> dict:
    """One model's ``energy_j_per_token`` and its ``energy_source``: the measured figure where the deployment stage
    read a counter, else ``watts`` × its measured latency per token (``source``: where the watts come from)."""
    if figures.get("measured_energy_j_per_token") is not None:
        return {
            "energy_j_per_token": figures["measured_energy_j_per_token"],
            "energy_source": "measured",
            "energy_basis": figures.get("energy_counter", "an energy counter"),
        }
    if figures.get("latency_ms_per_token") is None:
        return {"energy_j_per_token": None, "energy_source": None, "energy_basis": "no latency measured"}
    return {
        "energy_j_per_token": watts * figures["latency_ms_per_token"] / 1000.0,
        "energy_source": "estimated",
        "energy_basis": f"{watts:g} W × measured latency ({source})",
    }
