"""Finite training or a clear failure. Left to transformers, a learning rate of 1e300, a NaN teacher score or an fp16
overflow trains on silently: its ``logging_nan_inf_filter`` shows a NaN loss as the mean of the earlier ones, every
saved weight is NaN, and the stage would mark the model complete. Here each optimizer step checks

- the loss of each micro-batch, as it comes back from ``training_step`` (after its backward, before the update);
- the gradient, before the optimizer steps (a finite loss can still have a NaN gradient);
- the trainable weights, after it has stepped (a finite gradient times a learning rate of 1e300 is not finite),

so that training fails at the step that went wrong, naming it, before a checkpoint or the model holds a non-finite
weight: checkpoints are saved after ``on_step_end``, the model by ``sft.fit`` after training, and the stage's
manifest after that. Each check is one pass over the tensors with one device sync, small beside a step's forward
and backward."""

from __future__ import annotations

import torch
from transformers import TrainerCallback


class NonFiniteTraining(RuntimeError):
    """The loss, the gradient or the weights stopped being finite numbers; nothing from that step on was saved."""


def all_finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors]
    return not flags or bool(torch.stack(flags).all())  # one sync, not one per tensor


def _what(x: torch.Tensor) -> str:
    return "NaN" if torch.isnan(x).any() else "infinite"


def _stopped(label: str, trouble: str, state, args) -> NonFiniteTraining:
    step = state.global_step + 1  # the optimizer step under way: global_step counts the finished ones
    return NonFiniteTraining(
        f"{label}{trouble} at step {step} of {state.max_steps}; training stopped before that step's update, and "
        f"nothing from it on was saved (checkpoints hold the finite weights of earlier steps). Usual causes: a "
        f"learning rate too large (training.learning_rate is {args.learning_rate:g} here), a teacher's NaN or "
        "infinite scores, an fp16 overflow (train in bf16 or fp32). Fix the recipe or the teacher, then rerun."
    )


class FiniteSteps(TrainerCallback):
    """Fails training at the first step whose gradient or updated weights are not finite (``guard`` adds the loss
    check, which needs the trainer). ``label``: who is training, e.g. ``[students seq-kd] ``. ``grads``: False under
    fp16 loss scaling, where an overflowing gradient is routine — the scaler skips that step and lowers its scale."""

    def __init__(self, label: str = "", grads: bool = True):
        self.label, self.grads = label, grads

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not all_finite(grads):
            bad = next(g for g in grads if not torch.isfinite(g).all())
            raise _stopped(self.label, f"the gradient became {_what(bad)}", state, args)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        weights = [p for p in model.parameters() if p.requires_grad]  # frozen ones (LoRA's base) do not change
        if not all_finite(weights):
            bad = next(w for w in weights if not torch.isfinite(w).all())
            raise _stopped(self.label, f"the update made weights {_what(bad)}", state, args)


def guard(trainer, label: str = "") -> None:
    """Check ``trainer``'s loss, gradient and weights every step (module docstring). The loss check wraps the
    trainer's own ``training_step`` (on this instance), since no callback sees the loss: one place for every trainer
    ``sft.fit`` runs, TRL's own (GKD, GOLD) among them."""
    trainer.add_callback(FiniteSteps(label, grads=getattr(trainer.accelerator, "scaler", None) is None))
    step = trainer.training_step

    def checked(model, inputs, num_items_in_batch=None):
        loss = step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss.detach()).all():
            raise _stopped(label, f"the loss became {_what(loss.detach())}", trainer.state, trainer.args)
        return loss

    trainer.training_step = checked


def check_weights(model, doing: str) -> None:
    """Refuse to go on ``doing`` (e.g. saving) with a model holding a non-finite weight."""
    if all_finite(model.parameters()):
        return
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteTraining(
            f"{len(bad)} weight tensors of the trained model are not finite (e.g. {bad[0]}); "
            f"not {doing}. Lower training.learning_rate or check the teacher's scores, then rerun."
        )
