"""Teacher/student tokenizer compatibility, checked before any KD work.

White-box KD compares the teacher's and the student's distributions token by token, so both must split the
text into the same tokens with the same ids, mark turns with the same special tokens, and render chats with
the same template. A mismatch otherwise surfaces hours later as a shape error or, worse, as a loss that
trains on misaligned positions. So the check runs first and fails with the fix in the message; a recipe that
really wants different tokenizers says ``kd.cross_tokenizer: gold`` and gets TRL's GOLD trainer
(kdflow/training/gold.py), whose ULD loss aligns the two tokenizations by the bytes they cover.
"""

from __future__ import annotations

CROSS_TOKENIZER_METHODS = ("gold",)
SPECIAL_TOKENS = ("bos", "eos", "pad")
FIX = (
    "set kd.cross_tokenizer: gold to use TRL's GOLD (cross-tokenizer ULD) trainer, "
    "or use a student with the teacher's tokenizer"
)
SHOWN = 3  # differing tokens quoted in a message: enough to recognise the problem, short enough to read


class TokenizerMismatch(ValueError):
    """The teacher's and the student's tokenizers differ and the recipe did not ask for cross-tokenizer KD."""


def check_tokenizers(teacher_tokenizer, student_tokenizer, *, cross_tokenizer: str | None) -> list[str]:
    """Raise ``TokenizerMismatch`` when the tokenizers differ, unless ``cross_tokenizer`` is ``"gold"``.

    Returns the differences found (empty when the tokenizers are interchangeable), so a caller that was
    allowed to go ahead can log them.
    """
    if cross_tokenizer is not None and cross_tokenizer not in CROSS_TOKENIZER_METHODS:
        raise ValueError(
            f"kd.cross_tokenizer must be one of {CROSS_TOKENIZER_METHODS} or unset, got {cross_tokenizer!r}"
        )
    differences = tokenizer_differences(teacher_tokenizer, student_tokenizer)
    if differences and cross_tokenizer is None:
        raise TokenizerMismatch(
            "teacher and student tokenizers differ: " + "; ".join(differences) + f". To fix: {FIX}."
        )
    return differences


def tokenizer_differences(teacher_tokenizer, student_tokenizer) -> list[str]:
    """One line per aspect that differs: vocabulary, special tokens, chat template."""
    found = [vocab_difference(teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab())]
    found += [special_token_difference(teacher_tokenizer, student_tokenizer, name) for name in SPECIAL_TOKENS]
    found.append(template_difference(teacher_tokenizer.chat_template, student_tokenizer.chat_template))
    return [line for line in found if line]


def vocab_difference(teacher_vocab: dict[str, int], student_vocab: dict[str, int]) -> str | None:
    """Sizes and the first ids whose token differs, or None when the vocabularies are equal."""
    if teacher_vocab == student_vocab:
        return None
    teacher_tokens = {i: t for t, i in teacher_vocab.items()}
    student_tokens = {i: t for t, i in student_vocab.items()}
    ids = sorted(set(teacher_tokens) | set(student_tokens))
    differing = [i for i in ids if teacher_tokens.get(i) != student_tokens.get(i)]
    shown = ", ".join(
        f"id {i}: teacher {teacher_tokens.get(i)!r} vs student {student_tokens.get(i)!r}" for i in differing[:SHOWN]
    )
    return (
        f"vocabularies differ (teacher {len(teacher_vocab)} tokens, student {len(student_vocab)}; "
        f"{len(differing)} ids differ, first {shown})"
    )


def special_token_difference(teacher_tokenizer, student_tokenizer, name: str) -> str | None:
    """The ``name`` (bos/eos/pad) token and id of each side, or None when they agree."""
    teacher = (getattr(teacher_tokenizer, f"{name}_token"), getattr(teacher_tokenizer, f"{name}_token_id"))
    student = (getattr(student_tokenizer, f"{name}_token"), getattr(student_tokenizer, f"{name}_token_id"))
    if teacher == student:
        return None
    return f"{name} token differs (teacher {teacher[0]!r} id {teacher[1]}, student {student[0]!r} id {student[1]})"


def template_difference(teacher_template: str | None, student_template: str | None) -> str | None:
    """Where the chat templates first differ (templates run to kilobytes: quote a position, not the text)."""
    if teacher_template == student_template:
        return None
    if teacher_template is None or student_template is None:
        return (
            f"chat template differs (teacher {'none' if teacher_template is None else 'has one'}, "
            f"student {'none' if student_template is None else 'has one'})"
        )
    at = next(
        (i for i, (a, b) in enumerate(zip(teacher_template, student_template)) if a != b),
        min(len(teacher_template), len(student_template)),
    )
    return (
        f"chat template differs (teacher {len(teacher_template)} chars, student {len(student_template)}; "
        f"first difference at char {at})"
    )
