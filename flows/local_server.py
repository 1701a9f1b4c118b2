"""The temporary local Prefect server of a `kdflow` command: started in a session of its own, and dying with it.

Without PREFECT_API_URL, Prefect starts a temporary server for a flow (``SubprocessASGIServer`` in Prefect 3.9's
prefect/server/api/server.py) in the caller's process group. Ctrl-C, `timeout`, a container stop or a batch scheduler
signal the whole group, so the server went down with the flow, and the flow then spent 3-5 minutes in Prefect's client
retries, reporting its end to a server that was gone, and ended in an ``httpx.ConnectError`` traceback (measured: 280 s
after a Ctrl-C on `kdflow distill`). A flow killed with SIGKILL left that server running for good.

So a `kdflow` command starts the same server itself (the same uvicorn app and settings as Prefect's) in a new
session, which group signals do not reach, with the kernel's parent-death signal set, so that it goes when its command
goes, however that ends. The flow reports its end to a live server; the server is stopped last. A set PREFECT_API_URL
(a long-lived `prefect server start`, a deployment's worker) is used as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from flows import STARTUP_TIMEOUT_ENV

# How Prefect's RuntimeError begins when its temporary server never answered (prefect/server/api/server.py); this
# module raises the same, so that `kdflow` ends both with the one message that names the fix.
NO_SERVER = "Timed out while attempting to connect to ephemeral Prefect API server"
PR_SET_PDEATHSIG = 1
PORT_IN_USE = 3  # uvicorn's exit code when its port was taken between choosing it and binding it


def _die_with_parent(parent: int):
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    def in_child() -> None:  # runs in the forked child, before exec
        if libc is not None:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return in_child


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    import prefect

    port = _free_port()
    command = [
        *(sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent)),
        *("--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)),
        *("--log-level", "error", "--lifespan", "on"),
    ]
    process = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
    return process, port


def _drain_prefect_workers() -> None:
    """Send the logs and events still queued to the server while it is up (as Prefect's own test harness does before
    it stops its server, prefect/testing/utilities.py); a bounded wait, never a reason to fail the command."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=30)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def local_server() -> Iterator[str | None]:
    """A temporary Prefect server for the command's flows, its API URL set for this process and the processes it
    starts (students launched with torchrun, Dask workers); None, and nothing started, where PREFECT_API_URL is set."""
    import httpx
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    env = {
        # A throwaway server's usage heartbeat to Prefect: on a machine without internet (many training boxes) it
        # printed an ERROR line, or a "database is locked" traceback racing the new database's migrations, at the
        # start of every command. Off unless the user turned it on.
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    timeout_s = float(os.environ.get(STARTUP_TIMEOUT_ENV) or 600)
    process, port = _start(env)
    try:
        deadline = time.monotonic() + timeout_s  # a bound on a wait, not a measurement
        while True:
            if process.poll() == PORT_IN_USE:
                process, port = _start(env)
            elif process.poll() is not None:
                raise RuntimeError(f"{NO_SERVER}: the server process exited with code {process.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{NO_SERVER} within {timeout_s:g} s")
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/api"
        print(f"kdflow: temporary Prefect server (pid {process.pid}) on {url}", file=sys.stderr, flush=True)
        before = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                yield url
        finally:
            if before is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = before
            _drain_prefect_workers()
    finally:
        _stop(process)
