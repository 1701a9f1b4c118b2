"""Prompt templates are files under prompts/ (Jinja); a missing variable is an error, not an empty string."""

from __future__ import annotations

import jinja2

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)


def render(template_text: str, **variables) -> str:
    return _ENV.from_string(template_text).render(**variables).strip()


def chat(user: str, assistant: str | None = None) -> dict:
    """A prompt-completion row in TRL's conversational format."""
    row = {"prompt": [{"role": "user", "content": user}]}
    if assistant is not None:
        row["completion"] = [{"role": "assistant", "content": assistant}]
    return row
