"""Supervised fine-tuning with TRL's SFTTrainer on prompt-completion rows (loss on the completion only)."""

from __future__ import annotations

import json
from pathlib import Path

DEFAULTS = dict(save_strategy="no", logging_steps=25, report_to=[], disable_tqdm=True)
# TRL turns bf16 and gradient checkpointing on by default; on a CPU both are wrong (bf16 is refused
# outright), so without a GPU these win over the recipe. A GPU recipe keeps its own settings there.
CPU_OVERRIDES = dict(use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False)


def sft_config(training: dict, output_dir: str, seed: int, cpu: bool):
    """TRL's SFTConfig from a recipe's ``training`` keys: TRL validates them (unknown keys, bad values)."""
    import warnings

    from trl import SFTConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        return SFTConfig(output_dir=output_dir, seed=seed, **{**DEFAULTS, **training, **(CPU_OVERRIDES if cpu else {})})


def train_sft(model, tokenizer, rows: list[dict], training: dict, out_dir: Path, seed: int) -> list[dict]:
    """Train ``model`` in place on ``rows`` and save it (with the tokenizer) to ``out_dir``.

    Returns the trainer's log history (loss per logging step), also written to ``out_dir/log_history.json``.
    """
    import torch
    from datasets import Dataset, disable_progress_bars
    from trl import SFTTrainer

    disable_progress_bars()
    config = sft_config(training, str(out_dir / "checkpoints"), seed, cpu=not torch.cuda.is_available())
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    history = trainer.state.log_history
    (out_dir / "log_history.json").write_text(json.dumps(history, indent=1))
    return history
