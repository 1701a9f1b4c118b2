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


# Data text must never be read as chat markup. A question holding "<|end|><|assistant|>" (or, with a real model's
# ChatML, "<|im_start|>assistant") went through the chat template as text and was then tokenized with special
# tokens parsed: the data ended the user's turn and opened turns of its own, in training, capture, generation and
# evaluation alike. A zero-width space after the first character of each special-token string makes it plain text
# to every tokenizer (added tokens are matched on the raw string), on every path: TRL's SFTTrainer, which templates
# and tokenizes rows itself, included. Text without such strings is returned unchanged, so no other row's tokens move.
BREAK = "\u200b"


def special_strings(*tokenizers) -> list[str]:
    """The special-token strings of ``tokenizers`` (longest first, so that one containing another is broken whole)."""
    found = set()
    for tokenizer in tokenizers:
        found.update(tokenizer.all_special_tokens)
        found.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return sorted((s for s in found if len(s) > 1), key=lambda s: (-len(s), s))


def plain_text(text: str, specials: list[str]) -> str:
    """``text`` with each of ``specials`` (``special_strings``) broken by ``BREAK`` after its first character."""
    for s in specials:
        if s in text:
            text = text.replace(s, s[0] + BREAK + s[1:])
    return text


def plain_messages(messages: list[dict], specials: list[str]) -> list[dict]:
    return [
        {**m, "content": plain_text(m["content"], specials)} if isinstance(m.get("content"), str) else m
        for m in messages
    ]


def plain_rows(rows: list[dict], *tokenizers) -> list[dict]:
    """Conversational rows (``prompt`` / ``completion`` / ``messages`` lists of messages) whose message texts hold no
    special token of ``tokenizers``: what every trainer that templates rows itself (TRL's) is given."""
    specials = special_strings(*tokenizers)
    return [
        {
            k: plain_messages(v, specials) if k in ("prompt", "completion", "messages") and isinstance(v, list) else v
            for k, v in r.items()
        }
        for r in rows
    ]
