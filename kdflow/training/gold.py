"""Cross-tokenizer KD from a live teacher: TRL's GOLD trainer, for a student whose tokenizer differs from the
teacher's (``kd.cross_tokenizer: gold``).

The loss is ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation"): at each aligned position, the L1
distance between the two next-token distributions sorted by probability, which needs no shared vocabulary; GOLD's
extended ULD first aligns the two tokenizations of the completion by the bytes each token covers and merges the
probabilities of tokens one side splits (both tokenizers must be byte-level BPE for that; else set
``use_extended_uld: false`` in ``training``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from trl.import_utils import TRLExperimentalWarning

from kdflow.config.templates import plain_rows

with warnings.catch_warnings():
    warnings.simplefilter("ignore", TRLExperimentalWarning)  # chosen knowingly: GOLD lives only there
    from trl.experimental.gold import GOLDConfig, GOLDTrainer


def train_gold(
    student, teacher, tokenizer, rows: list[dict], config: GOLDConfig, out_dir: Path, callbacks: list | None = None
) -> list[dict]:
    """Train ``student`` in place from a live ``teacher`` with a different tokenizer, as TRL's ``GOLDConfig``
    ``config`` says, on prompt-completion ``rows``.

    ``config.teacher_tokenizer_name_or_path``: the folder of the teacher's tokenizer (GOLD loads it by name or
    path only); ``use_uld_loss``: true; ``lmbda``: fraction of steps trained on the student's own samples;
    ``temperature``: their sampling temperature; ``max_completion_length``: their length cap. Other GOLD settings
    (``uld_crossentropy_weight``, ``uld_use_hybrid_loss`` and ``beta`` for its matched tokens,
    ``uld_*_temperature``) pass through a recipe's ``training`` like every training key. GOLDConfig's own
    learning-rate default is 1e-7: a recipe should set ``learning_rate``.

    Saves the student and its tokenizer to ``out_dir/"model"``; returns the log history (GOLD adds
    ``on_policy_loss`` / ``off_policy_loss``), also written to ``out_dir/"log_history.json"``.
    """
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer

    from kdflow.training.sft import fit

    if not config.use_uld_loss or config.teacher_tokenizer_name_or_path is None:
        raise ValueError(
            "GOLD across tokenizers needs use_uld_loss=True and teacher_tokenizer_name_or_path (the teacher's "
            "tokenizer folder) in its GOLDConfig"
        )
    disable_progress_bars()
    teacher_tokenizer = AutoTokenizer.from_pretrained(config.teacher_tokenizer_name_or_path)
    trainer = GOLDTrainer(
        model=student,
        teacher_model=teacher.eval(),
        args=config,
        callbacks=callbacks,
        train_dataset=Dataset.from_list(plain_rows(rows, tokenizer, teacher_tokenizer)),
        processing_class=tokenizer,
    )
    return fit(trainer, student, tokenizer, out_dir)
