"""Teacher/student tokenizer compatibility, checked before any KD work, and cross-tokenizer KD with TRL's GOLD.

White-box KD compares the teacher's and the student's distributions token by token, so both must split the
text into the same tokens with the same ids, mark turns with the same special tokens, and render chats with
the same template. A mismatch otherwise surfaces hours later as a shape error or, worse, as a loss that
trains on misaligned positions. So the check runs first and fails with the fix in the message; a recipe that
really wants different tokenizers says ``kd.cross_tokenizer: gold`` and gets TRL's GOLD trainer, whose ULD
loss aligns the two tokenizations by the bytes they cover.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from kdflow.config.templates import plain_rows

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


def train_gold(
    student,
    teacher,
    student_tokenizer,
    teacher_tokenizer,
    rows: list[dict],
    training: dict,
    out_dir: Path,
    seed: int,
    *,
    lmbda: float,
    temperature: float,
    max_new_tokens: int,
    checkpoints: Path | None = None,
    callbacks: list | None = None,
) -> list[dict]:
    """Train ``student`` in place from a live ``teacher`` with a different tokenizer, by TRL's GOLD trainer.

    The loss is ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation"): at each aligned position,
    the L1 distance between the two next-token distributions sorted by probability, which needs no shared
    vocabulary; GOLD's extended ULD first aligns the two tokenizations of the completion by the bytes each
    token covers and merges the probabilities of tokens one side splits (both tokenizers must be
    byte-level BPE for that; else set ``use_extended_uld: false`` in ``training``). ``lmbda``: fraction of
    steps trained on the student's own samples; ``temperature``: their sampling temperature;
    ``max_new_tokens``: their length cap. Rows are prompt-completion conversations. ``checkpoints``: as in
    ``kdflow.training.sft.train_sft``.

    Other GOLD settings (``uld_crossentropy_weight``, ``uld_use_hybrid_loss`` and ``beta`` for its matched
    tokens, ``uld_*_temperature``) pass through ``training`` like every training key. GOLDConfig's own
    learning-rate default is 1e-7: a recipe should set ``learning_rate``.

    Saves the student and its tokenizer to ``out_dir/"model"``; returns the log history (GOLD adds
    ``on_policy_loss`` / ``off_policy_loss``), also written to ``out_dir/"log_history.json"``.
    """
    import tempfile

    import torch
    from datasets import Dataset, disable_progress_bars
    from trl.import_utils import TRLExperimentalWarning

    from kdflow.config.training import sft_config
    from kdflow.training.sft import fit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TRLExperimentalWarning)  # chosen knowingly: GOLD lives only there
        from trl.experimental.gold import GOLDConfig, GOLDTrainer

    disable_progress_bars()
    # GOLD loads the teacher's tokenizer by name or path only, so it gets a saved copy; it is read once, in
    # the trainer's constructor.
    with tempfile.TemporaryDirectory(prefix="kdflow-teacher-tokenizer-") as teacher_tokenizer_dir:
        teacher_tokenizer.save_pretrained(teacher_tokenizer_dir)
        config = sft_config(
            training,
            str(checkpoints or out_dir / "checkpoints"),
            seed,
            cpu=not torch.cuda.is_available(),
            checkpoints=checkpoints is not None,
            config_class=GOLDConfig,
            use_uld_loss=True,
            teacher_tokenizer_name_or_path=teacher_tokenizer_dir,
            lmbda=lmbda,
            temperature=temperature,
            max_completion_length=max_new_tokens,
        )
        trainer = GOLDTrainer(
            model=student,
            teacher_model=teacher.eval(),
            args=config,
            callbacks=callbacks,
            train_dataset=Dataset.from_list(plain_rows(rows, student_tokenizer, teacher_tokenizer)),
            processing_class=student_tokenizer,
        )
    return fit(trainer, student, student_tokenizer, out_dir, checkpoints)
