"""Prompt templates are files under prompts/ (Jinja); a missing variable is an error, not an empty string.

Templates render in Jinja's immutable sandbox: a template is a file a recipe names, so it may read the values it
is given and nothing else (``{{ ''.__class__.__mro__ }}`` and the like raise ``SecurityError`` instead of
reaching Python's internals), and it cannot change the rows passed to it."""

from __future__ import annotations

from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)


def render(template_text: str, **variables) -> str:
    return _ENV.from_string(template_text).render(**variables).strip()


def chat(user: str, assistant: str | None = None) -> dict:
    """A prompt-completion row in TRL's conversational format."""
    row = {"prompt": [{"role": "user", "content": user}]}
    if assistant is not None:
        row["completion"] = [{"role": "assistant", "content": assistant}]
    return row


def sft_rows(rows: list[dict], template: str, answer_field: str) -> list[dict]:
    """Prompt-completion rows: each row's question through ``template``, its ``answer_field`` as the completion."""
    return [chat(render(template, question=r["question"]), r[answer_field]) for r in rows]
