"""Imported first by the benchmarks that run flows: a Prefect home of their own (its temporary local server and
its results never mix with the user's), no analytics, time for a busy machine to start the server, no hub."""

import os
import tempfile
from contextlib import contextmanager

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="kdflow-bench-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a busy machine starts it slowly
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextmanager
def warm_server():
    """The temporary local server started once, outside every timing, and no heartbeat thread (it adds ~1 s to
    the end of every flow run and measures nothing)."""
    from prefect import flow
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    flow(name="warm-up")(lambda: None)()
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
