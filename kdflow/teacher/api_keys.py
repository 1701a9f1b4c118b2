"""The API key a recipe names by its environment variable (``api_key_env``), read when the stage runs.

A variable that is named but unset or empty is an error naming it, before any request: sent as an empty key, it
came back as "401 (the API key was rejected)", which sends one looking at the key instead of the environment.
"""

from __future__ import annotations

import os

from kdflow.teacher.api_client import FatalApiError


def from_env(variable: str | None, field: str) -> str | None:
    """The key in ``$variable``; None when the recipe names no variable (``field: null``: a server without keys).
    ``field``: the recipe field that names it, for the message."""
    if variable is None:
        return None
    value = os.environ.get(variable)
    if value is None or not value.strip():
        state = "is not set" if value is None else "is empty"
        raise FatalApiError(f"{field}: the environment variable {variable} {state}; export {variable}=<your key> "
                            f"where the stage runs, or set {field}: null for a server that takes no key")
    return value
