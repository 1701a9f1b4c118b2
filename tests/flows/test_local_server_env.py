"""The environment a `kdflow` command's temporary Prefect server starts with (flows/local_server.py): its usage
heartbeat to Prefect off unless the user set it (without internet it printed an ERROR line, or a "database is locked"
traceback, at the start of every command), and whatever else the user set passed through.

Each case runs in a fresh Python, as a command does: in this process the session's test server (conftest.py) has left
Prefect settings of its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import json
from flows import local_server

class Started(Exception):
    pass

def start(env):
    print(json.dumps({k: v for k, v in env.items() if k.startswith("PREFECT_")}))
    raise Started

local_server._start = start
try:
    with local_server.local_server():
        pass
except Started:
    pass
"""


def server_env(tmp_path: Path, **environ: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # no server given, nothing set
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), **environ}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_servers_usage_heartbeat_is_off_unless_the_user_turned_it_on(tmp_path):
    assert server_env(tmp_path)["PREFECT_SERVER_ANALYTICS_ENABLED"].lower() == "false"
    env = server_env(tmp_path, PREFECT_SERVER_ANALYTICS_ENABLED="true", PREFECT_LOGGING_LEVEL="DEBUG")
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"].lower() == "true" and env["PREFECT_LOGGING_LEVEL"] == "DEBUG"
