"""Supervised fine-tuning with TRL's SFTTrainer on prompt-completion rows (loss on the completion only),
and the save-and-resume contract every kdflow trainer shares (``fit``)."""

from __future__ import annotations

import json
from pathlib import Path

from kdflow.config.templates import plain_rows
from kdflow.store.model_folders import LOG_HISTORY
from kdflow.training.checkpoints import last_checkpoint, saving


def checkpoint_folder(config) -> Path | None:
    """Where a trainer on ``config`` checkpoints, and so what a rerun resumes from: its ``output_dir``, when it
    saves checkpoints at all (``kdflow.config.training.trainer_config`` with a checkpoint folder)."""
    return None if config.save_strategy == "no" else Path(config.output_dir)


def fit(trainer, model, tokenizer, out_dir: Path) -> list[dict]:
    """Train (resuming from the newest checkpoint in the config's ``checkpoint_folder`` if one is there), save the
    model and tokenizer to ``out_dir/model`` and the log history to ``out_dir/log_history.json``. A LoRA student (the
    trainer holds a peft model) is saved merged, its adapter beside it in ``out_dir/adapter``. Progress lines
    come from the ``kdflow.training.progress.TrainingProgress`` among the trainer's callbacks (give one naming
    the stage and the model).

    No blind retry: a rerun after a crash or kill continues from the newest whole checkpoint's step, with its
    optimizer, scheduler and RNG states (a torn one is set aside: ``kdflow.training.checkpoints``); a save that fails
    for want of space raises ``DiskFull`` naming the folder. The checkpoints stay: whoever owns their folder removes it
    once the output holding the model is complete (the students stage, ``kdflow.training.trained``), so that a failure
    after this returns resumes at the last step rather than at step 0.

    Training stays finite or fails (``kdflow.training.finite``): a non-finite loss, gradient or weight stops it at
    that step, before the update, and the model is saved only with finite weights, so a stage that writes its
    manifest after this returns never marks a NaN model complete.

    Under ``accelerate launch`` every process gets here holding the same weights (DDP keeps them in step):
    the main process alone writes, and the others wait until it has, so all return with the output complete.
    """
    from kdflow.training.finite import check_weights, guard
    from kdflow.training.progress import report_progress

    checkpoints = checkpoint_folder(trainer.args)
    label = report_progress(trainer)  # progress lines naming the model, not transformers' bare {'loss': ...} dicts
    guard(trainer, f"{label} ")
    resume = last_checkpoint(checkpoints, set_aside=trainer.accelerator.is_main_process)
    with saving(Path(trainer.args.output_dir)):
        trainer.train(resume_from_checkpoint=resume)
    history = trainer.state.log_history
    if resume:
        history = [{"resumed_from": Path(resume).name}, *history]
    if trainer.accelerator.is_main_process:
        check_weights(trainer.accelerator.unwrap_model(trainer.model), f"saving it to {out_dir}")
        with saving(out_dir):
            save_model(trainer, model, tokenizer, out_dir)
            (out_dir / LOG_HISTORY).write_text(json.dumps(history, indent=1))
    trainer.accelerator.wait_for_everyone()
    return history


def save_model(trainer, model, tokenizer, out_dir: Path) -> None:
    """``model`` (the trainer's own when None) and the tokenizer to ``out_dir/model``; a peft model merged."""
    from accelerate.utils import is_peft_model

    trained = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(trained):
        from kdflow.training.lora import save_merged

        model = save_merged(trained, out_dir)
    elif model is None:
        model = trained
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")


def train_sft(
    model, tokenizer, rows: list[dict], config, out_dir: Path, callbacks: list | None = None, peft_config=None
) -> list[dict]:
    """Train ``model`` in place on prompt-completion ``rows`` as TRL's ``SFTConfig`` ``config`` says
    (``kdflow.config.training.trainer_config`` builds it from a recipe's training keys), and save it (with the
    tokenizer) to ``out_dir``.

    The config's checkpoint folder (``checkpoint_folder``) outlives a failed attempt (it is not inside
    ``out_dir``, a temporary folder): a rerun resumes from it. ``peft_config``: train LoRA adapters only
    (``kdflow.training.lora.lora_config``). ``callbacks``: e.g. a ``TrainingProgress`` naming the model. Returns
    the trainer's log history (loss per logging step).
    """
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    # TRL templates and tokenizes the rows itself: their texts must hold no special token (templates.plain_rows)
    data = Dataset.from_list(plain_rows(rows, tokenizer))
    trainer = chunked_sft_trainer()(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
    )
    return fit(trainer, model, tokenizer, out_dir)


def chunked_sft_trainer():
    """TRL's SFTTrainer whose completion CE, on a CPU at a large vocabulary, runs through kdflow's chunked head
    (kdflow.training.chunked_loss) instead of TRL's own chunked log-probs. Measured on this machine at V = 151,936,
    bf16, 1,024 positions, hidden 256 (the head's forward and backward alone): 30 s and 208 MB over start, against
    TRL's 125-177 s and 1,160 MB (on a CPU, TRL folds 4,096 x 32,768 tiles with generic torch ops; on a GPU it runs
    its Triton kernels, which this does not try to beat, so a GPU keeps TRL's). Same loss: the completion tokens'
    summed NLL over ``num_items_in_batch`` as TRL computes it; TRL's entropy and token-accuracy metrics are not
    logged on this path. Elsewhere (the demo's 52-token vocabulary: one chunk would hold every position) it is
    TRL's own compute_loss, unchanged."""
    import torch
    from trl import SFTTrainer

    from kdflow.training.chunked_loss import head_losses
    from kdflow.training.head import final_hidden_states, fused_head
    from kdflow.training.losses import IGNORE_INDEX

    class ChunkedSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.get("labels")
            plain = (
                return_outputs
                or labels is None
                or "attention_mask" not in inputs
                or labels.device.type != "cpu"
                or self.args.loss_type != "nll"
                or self.label_smoother is not None
                or self.compute_loss_func is not None
                or self.aux_loss_enabled
            )
            targets = None if plain else labels[:, 1:]  # logits[:, t] predicts token t + 1
            head = None if plain else fused_head(model, int((targets != IGNORE_INDEX).sum()), "SFT")
            if head is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            at = targets != IGNORE_INDEX
            _, hidden = final_hidden_states(model, inputs)
            nll, _ = head_losses(hidden[:, :-1][at], head.weight, head.bias, labels=targets[at])
            count = at.sum() if num_items_in_batch is None else num_items_in_batch
            loss = nll.sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:  # as TRL's: DDP averages
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            mode = "train" if self.model.training else "eval"
            if mode == "train":
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += tokens // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return ChunkedSFTTrainer
