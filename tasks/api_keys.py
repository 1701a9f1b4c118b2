"""The one reader of API keys for the stages that call an API off this machine (the teacher's answers, the API
teacher's evaluation, the LLM judge), and what such an API serves under the recipe's name. It lives beside the tasks,
not in the library, because a key may sit in a Prefect Secret block."""

from __future__ import annotations

from kdflow.config.generation import Backend, GenerationSection
from kdflow.teacher import api_keys
from kdflow.teacher.served import served_identity


def read_api_key(secret_block: str | None, env: str | None, field: str) -> str | None:
    """The key from the Prefect Secret block or, else, the environment variable the recipe names (``field``: the
    recipe key that names the variable, for the error when it is unset or empty). The value is never logged."""
    if secret_block:
        from prefect.blocks.system import Secret

        return Secret.load(secret_block).get()
    return api_keys.from_env(env, field)


def generation_api_key(section: GenerationSection) -> str | None:
    return read_api_key(section.api.api_key_secret_block, section.api.api_key_env, "generation.api.api_key_env")


def served(section: GenerationSection) -> dict:
    """``{"served": <the model's card>}`` where an API answers under a name the recipe gives (``api.model``): a
    different model served under that name at that URL is new content (kdflow/teacher/served.py); ``{}`` where the
    run's own weights answer (hf, a local vLLM server, or an API serving the teacher's folder), or where the server
    never said which model it serves: the key then is what it always was."""
    if section.backend is not Backend.openai or section.api.model is None:
        return {}
    identity = served_identity(section.api.base_url, section.api.model, lambda: generation_api_key(section))
    return {"served": identity} if identity else {}
