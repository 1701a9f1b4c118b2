"""A `kdflow` command's temporary Prefect server (flows/local_server.py) against the signals that stop a command:
Ctrl-C and SIGTERM to the whole process group (a terminal, `timeout`, a container stop, a batch scheduler) and SIGKILL
to the command alone. Before, the server was in the command's process group: a group signal took it down first, and
the flow spent 3-5 minutes in client retries and ended in an ``httpx.ConnectError`` traceback; after a SIGKILL the
server ran on for good.

Each test runs `python -m flows.distill` on tests/mini.yaml with a teacher that trains for a very long time, signals
it once the teacher's progress shows, and checks how it ended. The waits below only stop a hang: nothing here depends
on how fast the machine is."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
SERVER = re.compile(r"temporary Prefect server \(pid (\d+)\)")
HANG_S = 900


def started_command(tmp_path: Path) -> tuple[subprocess.Popen, Path, int]:
    """The distill flow in a process group of its own, as a terminal starts it (Ctrl-C not ignored), once its teacher
    has logged progress; with the temporary server's pid."""
    text = (ROOT / "tests" / "mini.yaml").read_text().replace("root: runs", f"root: {tmp_path / 'runs'}")
    text = text.replace("max_steps: 150,", "max_steps: 10000000,")  # still training whenever the signal comes
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # no server given: the command starts one
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    log = tmp_path / "out.log"
    with open(log, "w") as out:
        command = subprocess.Popen(
            [sys.executable, "-m", "flows.distill", str(recipe)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + HANG_S
        while "[teacher teacher] step" not in log.read_text():
            assert command.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the teacher never started training"
            time.sleep(0.5)
        server = SERVER.search(log.read_text())
        assert server, log.read_text()[-3000:]
    except BaseException:  # never leave a teacher training for ten million steps behind a failed test
        os.killpg(command.pid, signal.SIGKILL)
        command.wait()
        raise
    return command, log, int(server.group(1))


def signalled_until_it_ends(command: subprocess.Popen, log: Path, sig: int) -> int:
    """Signals the command's process group; again if the teacher logs progress twice after it (Python drops a
    KeyboardInterrupt raised inside a destructor, so a Ctrl-C can go unheard: a user presses it again)."""
    steps = lambda: log.read_text().count("[teacher teacher] step")  # noqa: E731
    deadline, sent_at = time.monotonic() + HANG_S, None
    while command.poll() is None:
        if sent_at is None or steps() >= sent_at + 2:
            sent_at = steps()
            os.killpg(command.pid, sig)
        assert time.monotonic() < deadline, "the command did not end"
        time.sleep(0.2)
    return command.returncode


def gone(pid: int) -> bool:
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.parametrize(
    ("sig", "rc", "crash"),
    [
        (signal.SIGINT, 130, "aborted by an interrupt signal"),
        (signal.SIGTERM, -signal.SIGTERM, "aborted by a termination signal"),
    ],
)
def test_a_group_signal_ends_the_command_reported_to_a_live_server(tmp_path, sig, rc, crash):
    command, log, server = started_command(tmp_path)
    try:
        assert signalled_until_it_ends(command, log, sig) == rc
    finally:
        command.kill()
    out = log.read_text()
    assert f"Finished in state Crashed('Execution was {crash}.')" in out  # the server heard the flow's end
    for failure in ("ConnectError", "Connection refused", "All connection attempts failed"):
        assert failure not in out, out[-3000:]
    if sig == signal.SIGINT:
        assert "interrupted. Finished stages are kept" in out
    assert gone(server)


def test_the_server_goes_with_a_command_killed_outright(tmp_path):
    command, log, server = started_command(tmp_path)
    command.kill()
    command.wait()
    try:
        assert gone(server), f"the temporary server (pid {server}) outlived its command"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)
