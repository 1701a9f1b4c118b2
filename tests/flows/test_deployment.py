"""prefect.yaml for real: `prefect server start` on 127.0.0.1 (its own SQLite under a temporary PREFECT_HOME),
`prefect --no-prompt deploy` of the demo deployment, a flow run created through the REST API as the UI's
"Run" button does (with the miniature recipe as its parameter), a process worker that runs it, the report
artifact read back from the API, and the flow run's UI page loaded in headless Chromium (screenshot kept in
the test's tmp folder, a copy in .pytest_cache/d/kdflow-ui/)."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
HANG_S = 300  # a bound on waits that only catches a hang (the suite's Prefect server gets as long to start)
GRACE_S = 30  # docs, "Stopping a worker": a worker still running this long after one Ctrl-C gets a second
RETRIES_503 = 8
HTTP_TIMEOUT_S = 60  # per request: catches a dead server, not a slow one
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
    "--virtual-time-budget=15000",
]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api: str, server: subprocess.Popen, timeout_s: float = HANG_S) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"prefect server exited with {server.returncode}")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy after {timeout_s} s")


def call(method: str, url: str, **kwargs):
    """One REST call to the Prefect server, retried while it answers 503: the server's word for "retry" (its
    SQLite was locked by its own background services — it happened here under a full suite's load), which the
    Prefect client and the UI retry too. Bounded by a count, not a time."""
    import httpx

    for attempt in range(RETRIES_503):
        response = httpx.request(method, url, timeout=HTTP_TIMEOUT_S, **kwargs)
        if response.status_code != 503:
            return response
        time.sleep(min(2**attempt, 10))
    return response


def stop(process: subprocess.Popen) -> None:
    """SIGINT first (a worker ignores SIGTERM for a while), then SIGKILL the process group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def server(tmp_path):
    """(api url, env for CLI calls) of a fresh `prefect server start` on a free port."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        # The UI asks this address for the API; without it, it tries port 4200.
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_healthy(api, process)
        yield api, env
    finally:
        stop(process)
        log.close()


def prefect_cli(env: dict, *args: str) -> str:
    done = subprocess.run([*PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def wait_final(api: str, run_id: str, worker: subprocess.Popen, timeout_s: float = 900) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = call("GET", f"{api}/flow_runs/{run_id}").json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        if worker.poll() is not None:
            raise AssertionError(f"the worker exited ({worker.returncode}); the run is {run['state']['type']}")
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not finished after {timeout_s} s: {run['state']}")


def exited(process: subprocess.Popen, timeout_s: float) -> bool:
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout_s)
    return process.poll() is not None


def where_it_waits(process: subprocess.Popen, log_path: Path) -> str:
    """Every thread's Python stack (faulthandler on SIGUSR1, written to the log) and, from /proc, each thread's
    state, kernel wait channel and system call: where a stuck process waits, above and below Python."""
    before = len(log_path.read_text())
    os.kill(process.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while len(log_path.read_text()) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # the rest of the dump
    threads = []
    with contextlib.suppress(OSError):
        for task in sorted(Path(f"/proc/{process.pid}/task").iterdir()):
            with contextlib.suppress(OSError):
                stat, name = (task / "stat").read_text(), (task / "comm").read_text().strip()
                threads.append(
                    f"  {task.name} {name} state {stat[stat.rindex(')') + 2]} wchan "
                    f"{(task / 'wchan').read_text()} syscall {(task / 'syscall').read_text().strip()}"
                )
    return (
        log_path.read_text()[before:]
        + "threads (/proc: id, name, state, wait channel, system call):\n"
        + "\n".join(threads)
    )


def test_deploy_run_from_api_and_see_it_in_the_ui(server, mini_recipe, tmp_path, request):
    api, env = server
    prefect_cli(env, "work-pool", "create", "kdflow-cpu", "--type", "process")
    prefect_cli(env, "--no-prompt", "deploy", "--name", "demo")
    deployment = call("GET", f"{api}/deployments/name/distill/demo").json()
    assert deployment["enforce_parameter_schema"] is True
    assert deployment["parameter_openapi_schema"]["properties"]["recipe"]["type"] == "string"  # the UI's form
    assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(ROOT)

    # What the UI's "Run" button sends: a flow run of the deployment with the form's parameters.
    created = call(
        "POST",
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"recipe": str(mini_recipe)}},
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]

    log = open(tmp_path / "worker.log", "w")
    # A long-lived worker as a user starts one (asking the server every 2 s instead of 15), stopped after the run.
    worker = subprocess.Popen(
        [*PREFECT, "worker", "start", "--pool", "kdflow-cpu"],
        env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        run = wait_final(api, run_id, worker)
    finally:
        stop(worker)
        log.close()
    assert run["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-4000:]
    assert (mini_recipe.parent / "runs" / "mini" / "report.md").is_file()

    artifacts = call(
        "POST",
        f"{api}/artifacts/filter",
        json={"artifacts": {"key": {"any_": ["mini-report"]}, "flow_run_id": {"any_": [run_id]}}},
    ).json()
    assert artifacts and "kdflow report: mini" in artifacts[0]["data"]

    # Task runs say what they are for (the student, the model, the backend), as the UI lists them.
    names = {
        r["name"]
        for r in call("POST", f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
    }
    assert {
        "train_student[baseline]",
        "train_student[seq-kd]",
        "evaluate_model[teacher]",
        "evaluate_model[baseline]",
        "evaluate_model[seq-kd]",
        "generate_answers[hf]",
    } <= names, names

    # The flow run's page as a user opens it: the UI must reach the API and show this run.
    chromium = shutil.which("chromium")
    assert chromium, "no chromium on PATH: `make test` installs it (apt-get install -y chromium)"
    page = f"http://127.0.0.1:{api.split(':')[2].split('/')[0]}/runs/flow-run/{run_id}"
    browse = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run([*browse, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert run["name"] in dom, "the UI page does not show the flow run's name"
    assert "Can't connect to Server API" not in dom
    screenshot = tmp_path / "flow-run.png"
    subprocess.run([*browse, f"--screenshot={screenshot}", page], capture_output=True, timeout=120, check=True)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000, "no (or an empty) screenshot"
    # pytest keeps only its last 3 tmp folders (other pytest runs rotate them away): a copy in its cache folder,
    # where there is one (`-p no:cacheprovider` leaves config.cache out).
    cache = getattr(request.config, "cache", None)
    kept = shutil.copy(screenshot, cache.mkdir("kdflow-ui") / "flow-run.png") if cache else "no pytest cache"
    print(f"screenshot of the flow run's UI page: {screenshot} (kept: {kept})")


def test_deploy_all_needs_only_the_cpu_pool_the_gpu_file_is_opt_in_and_a_worker_stops(server, tmp_path):
    """The documented commands on a fresh server: `deploy --all` with only kdflow-cpu deploys the CPU deployments
    (the GPU one is in prefect-gpu.yaml, refused until its pool exists); a worker started with --run-once exits by
    itself; and an idle worker stops by the docs' "Stopping a worker", exactly: Ctrl-C (SIGINT); if it still
    runs GRACE_S later, Ctrl-C again (Prefect's handler answers a second SIGINT with SIGKILL); if even that finds
    no Python to run it, kill -KILL.

    Why the second step (issue 23): once, in a fresh-clone `make test` on a loaded 2-core machine, a worker printed
    "Received SIGINT" and still ran 300 s later. Not reproduced in 80 tries under CPU load, but the way it can
    happen is in Prefect 3.9.1: at interpreter exit `threading._shutdown` runs `QueueService._at_exit`
    (prefect/_internal/concurrency/services.py), whose `drain()` waits on `Future.result()` with no timeout for the
    EventsWorker to send the worker-started/stopped events; the events client retries the websocket 11 times
    (10 s opening handshake each), and its ping and auth reply have no timeout of their own. With the server
    stopped (SIGSTOP) just after "started!", one SIGINT took 123 s to end the worker; a second SIGINT ended it at
    once (SIGKILL), from that wait and from a teardown that never returns alike. The stacks of a slow stop are
    kept as a warning (where_it_waits), so a recurrence leaves its evidence without failing the suite."""
    api, env = server
    prefect_cli(env, "work-pool", "create", "kdflow-cpu", "--type", "process")
    prefect_cli(env, "--no-prompt", "deploy", "--all")
    names = {d["name"] for d in call("POST", f"{api}/deployments/filter", json={}).json()}
    assert names == {"demo", "demo-students", "on-policy"}

    gpu = [*PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "prefect-gpu.yaml"]
    refused = subprocess.run(gpu, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert refused.returncode != 0 and "kdflow-gpu" in refused.stdout + refused.stderr
    prefect_cli(env, "work-pool", "create", "kdflow-gpu", "--type", "process")
    prefect_cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", "prefect-gpu.yaml")
    deployment = call("GET", f"{api}/deployments/name/distill/gsm8k-qwen7b-to-0.5b").json()
    assert deployment["work_pool_name"] == "kdflow-gpu"
    assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(ROOT)

    once = subprocess.run(
        [*PREFECT, "worker", "start", "--pool", "kdflow-cpu", "--run-once"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert once.returncode == 0, once.stdout + once.stderr

    log_path = tmp_path / "idle-worker.log"
    # `python -m prefect worker start`, plus a faulthandler on SIGUSR1 for the diagnosis in where_it_waits.
    dumpable = [
        sys.executable,
        "-c",
        "import faulthandler, signal; faulthandler.register(signal.SIGUSR1, "
        "all_threads=True); from prefect.cli import app; app()",
    ]
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [*dumpable, "worker", "start", "--pool", "kdflow-cpu"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + HANG_S
        while "started!" not in log_path.read_text() and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.5)
        assert "started!" in log_path.read_text(), log_path.read_text()

        # The docs' "Stopping a worker", step by step. GRACE_S only chooses when to take the next step; which step
        # stopped the worker does not decide the result, so the machine's speed does not either.
        os.kill(worker.pid, signal.SIGINT)  # Ctrl-C
        stopped_by, evidence = "one SIGINT", ""
        if not exited(worker, GRACE_S):
            evidence = where_it_waits(worker, log_path)
            os.kill(worker.pid, signal.SIGINT)  # Ctrl-C again: Prefect's handler SIGKILLs the worker
            stopped_by = "a second SIGINT"
            if not exited(worker, HANG_S):
                evidence += "\n" + where_it_waits(worker, log_path)
                os.kill(worker.pid, signal.SIGKILL)  # kill -KILL <pid>
                stopped_by = "kill -KILL"
                worker.wait(HANG_S)
        if evidence:  # a recurrence of the slow or hung exit leaves its stacks in the test report
            warnings.warn(
                f"the idle worker still ran {GRACE_S} s after one SIGINT; {stopped_by} stopped it. "
                f"Where it waited:\n{evidence}"
            )
        log = log_path.read_text()
        assert worker.returncode == {"one SIGINT": 0}.get(stopped_by, -signal.SIGKILL), f"{stopped_by}:\n{log}"
        assert stopped_by != "a second SIGINT" or "Sending SIGKILL to the process worker" in log, log
    finally:
        stop(worker)
