"""The API key a recipe names by its environment variable (``api_key_env``), read when the stage runs, and
checked when the flow starts (``key_needs``, ``check_env_keys``) for an API off this machine.

A variable that is named but unset or empty is an error naming it, before any request: sent as an empty key, it
came back as "401 (the API key was rejected)", which sends one looking at the key instead of the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from kdflow.config.fields import redact_url
from kdflow.teacher.api_client import FatalApiError


def from_env(variable: str | None, field: str) -> str | None:
    """The key in ``$variable``; None when the recipe names no variable (``field: null``: a server without keys).
    ``field``: the recipe field that names it, for the message."""
    if variable is None:
        return None
    if state := unset(variable):
        raise FatalApiError(
            f"{field}: the environment variable {variable} {state}; export {variable}=<your key> "
            f"where the stage runs, or set {field}: null for a server that takes no key"
        )
    return os.environ[variable]


def unset(variable: str) -> str | None:
    """How ``$variable`` holds no key ("is not set", "is empty"), or None when it holds one."""
    value = os.environ.get(variable)
    if value is None:
        return "is not set"
    return "is empty" if not value.strip() else None


# Hosts that are this machine: a server there (vLLM, SGLang, a test double) usually takes no key, so a missing one
# is not an error before the run; the stage itself still names an unset variable if it needs one.
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class MissingApiKey(FatalApiError):
    """An API the recipe sends requests to off this machine, with no key to send: raised at flow start."""


@dataclass(frozen=True)
class KeyNeed:
    """An endpoint a run will call with a key: ``field`` is the recipe section naming it (``generation.api``)."""

    field: str
    base_url: str | None
    env: str | None
    secret_block: str | None


def is_local(base_url: str | None) -> bool:
    """True for a URL on this machine. None is the OpenAI client's default, https://api.openai.com/v1: not local."""
    return bool(base_url) and urlsplit(base_url).hostname in LOCAL_HOSTS


def key_needs(generation=None, judge=None) -> list[KeyNeed]:
    """The keys a run needs before it starts: those of the generation section and the judge (either may be None)
    whose backend is ``openai`` at a URL off this machine, and whose recipe names a variable or a Secret block
    (``api_key_env: null`` with no block says the endpoint takes no key)."""
    endpoints = []
    if generation is not None and generation.backend.value == "openai":
        a = generation.api
        endpoints.append(KeyNeed("generation.api", a.base_url, a.api_key_env, a.api_key_secret_block))
    if judge is not None and judge.backend.value == "openai":
        endpoints.append(KeyNeed("evaluation.judge", judge.base_url, judge.api_key_env, judge.api_key_secret_block))
    return [n for n in endpoints if not is_local(n.base_url) and (n.env or n.secret_block)]


def check_env_keys(needs: list[KeyNeed]) -> None:
    """Fail before any work when a variable a remote endpoint's key comes from is unset or empty, naming it and
    the fix; the first sign was otherwise a 401 once the stage had started. A Secret block is checked by the
    caller that can read one (flows/chain.py): this library does not import Prefect."""
    for n in needs:
        if n.secret_block:
            continue
        if state := unset(n.env):
            raise MissingApiKey(
                f"{n.field}.api_key_env: the environment variable {n.env} {state}, and {n.field}.base_url "
                f"{redact_url(n.base_url) or '(the OpenAI default, https://api.openai.com/v1)'} is not this machine: "
                f"export {n.env}=<your key> where the flow runs, or name a Prefect Secret block holding it in "
                f"{n.field}.api_key_secret_block (nothing was started)"
            )
