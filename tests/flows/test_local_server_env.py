"""The environment a `kdflow` command's temporary Prefect server starts with (flows/local_server.py): its usage
heartbeat to Prefect off unless the user set it (without internet it printed an ERROR line, or a "database is locked"
traceback, at the start of every command), and whatever else the user set passed through."""

import pytest

from flows import local_server


class Started(Exception):
    """Raised in place of starting the server: the test needs only the environment it would get."""


def server_env(monkeypatch, **environ) -> dict:
    seen = {}

    def start(env):
        seen.update(env)
        raise Started

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(local_server, "_start", start)
    with pytest.raises(Started), local_server.local_server():
        pass
    return seen


def test_the_servers_usage_heartbeat_is_off_unless_the_user_turned_it_on(monkeypatch):
    assert server_env(monkeypatch)["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    env = server_env(monkeypatch, PREFECT_SERVER_ANALYTICS_ENABLED="true", PREFECT_LOGGING_LEVEL="DEBUG")
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true" and env["PREFECT_LOGGING_LEVEL"] == "DEBUG"
