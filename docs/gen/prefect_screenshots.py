"""The Prefect UI screenshots of docs/howto/prefect.md, from a real server: run by hand, not by the docs build.

    .venv/bin/python docs/gen/prefect_screenshots.py      # needs chromium (`make chromium`)

A fresh `prefect server start` on a free port (its own PREFECT_HOME in a temporary folder), the `demo` deployment of
prefect.yaml, a flow run of it created as the UI's Run button does with the miniature recipe (tests/mini.yaml) as
its parameter, a process worker that runs it, then headless Chromium on the flow run's page, the deployment's page and
the run's report artifact, saved to docs/howto/img/prefect-{flow-run,deployment,report-artifact}.png. The same steps as
tests/flows/test_deployment.py, which checks them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tasks.artifacts import artifact_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "howto" / "img"
PREFECT = [sys.executable, "-m", "prefect"]
CHROMIUM = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=40000",  # the UI settles (no loading overlay) on a loaded machine too
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise SystemExit(f"{what}: not after {timeout_s} s")


def healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop(process: subprocess.Popen) -> None:
    """SIGINT (a worker's Ctrl-C), then SIGKILL the process group if it still runs after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def shoot(tmp: Path, url: str, name: str, height: int = 900) -> None:
    chromium = shutil.which("chromium") or sys.exit("no chromium on PATH: `make chromium` installs it")
    out = OUT / name
    profile = f"--user-data-dir={tmp / ('chromium-' + name)}"
    size = f"--window-size=1400,{height}"
    subprocess.run(
        [chromium, *CHROMIUM, size, profile, f"--screenshot={out}", url], capture_output=True, timeout=300, check=True
    )
    print(f"{out.relative_to(ROOT)}  <-  {url}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="kdflow-ui-"))
    port = free_port()
    ui, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,  # else the UI looks for the API on port 4200
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    recipe = tmp / "mini.yaml"
    recipe.write_text((ROOT / "tests" / "mini.yaml").read_text().replace("root: runs", f"root: {tmp / 'runs'}"))
    with open(tmp / "server.log", "w") as log:
        server = subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for("prefect server healthy", lambda: healthy(api))
        for args in (
            ["work-pool", "create", "kdflow-cpu", "--type", "process"],
            ["--no-prompt", "deploy", "--name", "demo"],
        ):
            subprocess.run([*PREFECT, *args], env=env, cwd=ROOT, check=True, capture_output=True, timeout=300)
        deployment = httpx.get(f"{api}/deployments/name/distill/demo", timeout=60).json()
        run = httpx.post(
            f"{api}/deployments/{deployment['id']}/create_flow_run",
            json={"parameters": {"recipe": str(recipe)}},
            timeout=60,
        ).json()
        with open(tmp / "worker.log", "w") as log:
            worker = subprocess.Popen(
                [*PREFECT, "worker", "start", "--pool", "kdflow-cpu"],
                env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
                cwd=tmp,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
            state = lambda: httpx.get(f"{api}/flow_runs/{run['id']}", timeout=60).json()["state"]["type"]  # noqa: E731
            wait_for("the flow run", lambda: state() in final, timeout_s=1200)
        finally:
            stop(worker)
        if state() != "COMPLETED":
            sys.exit(f"the flow run ended {state()}: see {tmp / 'worker.log'}")
        shoot(tmp, f"{ui}/runs/flow-run/{run['id']}", "prefect-flow-run.png")
        shoot(tmp, f"{ui}/deployments/deployment/{deployment['id']}", "prefect-deployment.png")
        key = artifact_key("mini", "report")  # tests/mini.yaml's run name
        found = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}}, timeout=60).json()
        if not found:
            sys.exit(f"no {key!r} artifact on the server: see {tmp / 'worker.log'}")
        shoot(tmp, f"{ui}/artifacts/artifact/{found[0]['id']}", "prefect-report-artifact.png", height=1600)
    finally:
        stop(server)
    shutil.rmtree(tmp, ignore_errors=True)  # kept, with the server's and the worker's logs, when something failed


if __name__ == "__main__":
    main()
