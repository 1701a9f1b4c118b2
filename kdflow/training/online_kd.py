"""Online KD with a live teacher: TRL's own GKD trainer (Agarwal et al. 2024, "On-Policy Distillation of
Language Models"), for a teacher that fits in memory beside the student.

Each step, with probability ``lmbda`` the batch's completions are replaced by the student's own samples
(on-policy); otherwise the dataset's completions are used. On the chosen sequences the loss is the
generalized JSD(β) between the teacher's and the student's next-token distributions over the completion
tokens: β = 0 is forward KL(teacher ‖ student), β = 1 reverse KL, as in ``kdflow.training.losses.Divergence.jsd``.

Why GKD (``trl.experimental.gkd``) and not ``trl.DistillationTrainer``: the latter is fully on-policy (no
λ: it never trains on the dataset's completions). In TRL 1.16's GKD, ``temperature`` is the *sampling*
temperature of the on-policy completions only; the divergence is taken at T = 1.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from trl.import_utils import TRLExperimentalWarning

from kdflow.config.templates import plain_rows

with warnings.catch_warnings():
    warnings.simplefilter("ignore", TRLExperimentalWarning)  # chosen knowingly: GKD lives only there
    from trl.experimental.gkd import GKDConfig, GKDTrainer


def messages_row(row: dict) -> dict:
    """A prompt-completion row as one ``messages`` conversation: the form GKD's collator reads (it re-renders
    the prompt as ``messages[:-1]`` with the generation prompt, and masks it out of the loss)."""
    return {"messages": [*row["prompt"], *row["completion"]]}


def train_online(
    student,
    teacher,
    tokenizer,
    rows: list[dict],
    config: GKDConfig,
    out_dir: Path,
    callbacks: list | None = None,
    peft_config=None,
) -> list[dict]:
    """Train ``student`` in place by GKD from the live ``teacher`` on prompt-completion ``rows``, as TRL's
    ``GKDConfig`` ``config`` says.

    ``config.lmbda``: fraction of steps trained on the student's own samples (0 = the dataset's completions only);
    ``beta``: JSD interpolation (0 forward KL, 1 reverse KL); ``temperature``: sampling temperature of the
    on-policy completions; ``max_new_tokens``: their length cap. GKDConfig refuses ``lmbda`` or ``beta``
    outside [0, 1]. Teacher and student must share the tokenizer (check with
    ``kdflow.training.tokenizer_compat.check_tokenizers``). ``peft_config``: as in ``kdflow.training.sft.train_sft``.

    Saves the student and the tokenizer to ``out_dir/"model"``; returns the log history, also written to
    ``out_dir/"log_history.json"``.
    """
    from datasets import Dataset, disable_progress_bars

    from kdflow.training.sft import fit

    disable_progress_bars()
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher.eval(),
        args=config,
        callbacks=callbacks,
        peft_config=peft_config,
        train_dataset=Dataset.from_list([messages_row(r) for r in plain_rows(rows, tokenizer)]),
        processing_class=tokenizer,
    )
    return fit(trainer, student, tokenizer, out_dir)
