"""Feature (hidden-state) KD: the student's hidden states, linearly projected, are pulled towards a live teacher's.

FitNets (Romero et al. 2015) hint learning and TinyBERT / DistilBERT-style layer mapping: pairs of
(student layer, teacher layer), a learned linear map from the student's width to the teacher's where they
differ, and an MSE or cosine distance added to the student's usual LM loss:

    loss = CE(completion tokens) + weight · mean over pairs of D(P_k h_s[s_k], h_t[t_k])

Layer indices follow transformers' ``hidden_states``: 0 is the embedding output, i the output of block i,
and the last index (= the number of layers) is after the final norm, which is what the LM head reads.
Teacher and student must share the tokenizer (positions are compared one to one): check with
``kdflow.training.tokenizer_compat.check_tokenizers`` first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from trl import SFTConfig, SFTTrainer

from kdflow.config.kd import FeatureLoss, check_settings
from kdflow.config.templates import plain_rows
from kdflow.training.losses import IGNORE_INDEX, cross_entropy

PROJECTIONS = "feature_projections"  # the student attribute holding the projections while it trains


class FeatureLossKind(str, enum.Enum):
    """Distance between a projected student hidden state and the teacher's, per position.

    - ``mse``: ``mean_d (P h_s − h_t)²`` (mean over the teacher's width, so the scale does not grow with it);
    - ``cosine``: ``1 − cos(P h_s, h_t)``, in [0, 2]: direction only, blind to the teacher's norm.
    """

    mse = "mse"
    cosine = "cosine"


def feature_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    projection: nn.Module,
    mask: torch.Tensor,
    kind: FeatureLossKind | str,
) -> torch.Tensor:
    """Mean over the positions ``mask`` keeps of the distance between ``projection(student)`` and ``teacher``.

    ``student_hidden``: (B, L, Ds); ``teacher_hidden``: (B, L, Dt); ``projection``: Ds -> Dt (``nn.Identity``
    when Ds == Dt); ``mask``: (B, L) bool, True on the completion tokens (prompt and padding are False).
    Only kept positions are projected, so masked ones cost nothing and cannot leak into the loss. An
    all-masked batch gives a zero that is still connected to the projection (backward works).
    """
    kind = FeatureLossKind(kind)
    if student_hidden.shape[:2] != teacher_hidden.shape[:2] or mask.shape != student_hidden.shape[:2]:
        raise ValueError(
            f"positions differ: student {tuple(student_hidden.shape)}, teacher "
            f"{tuple(teacher_hidden.shape)}, mask {tuple(mask.shape)} (same tokenizer and batch needed)"
        )
    projected = projection(student_hidden[mask]).float()  # (N, Dt)
    target = teacher_hidden[mask].float()
    if kind is FeatureLossKind.mse:
        per_position = (projected - target).pow(2).mean(dim=-1)
    else:
        per_position = 1.0 - nn.functional.cosine_similarity(projected, target, dim=-1)
    return per_position.sum() / max(per_position.numel(), 1)


def default_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student block s -> teacher block round(s · T / S), for s = 1..S: spread uniformly, last to last."""
    return [
        (s, (2 * s * teacher_layers + student_layers) // (2 * student_layers)) for s in range(1, student_layers + 1)
    ]


def check_layer_map(
    layer_map: list[tuple[int, int]], student_layers: int, teacher_layers: int
) -> list[tuple[int, int]]:
    """The map as a list of int pairs, or a ValueError naming the bad pair and the allowed range."""
    pairs = [(int(s), int(t)) for s, t in layer_map]
    if not pairs:
        raise ValueError(
            "layer_map is empty: give at least one (student_layer, teacher_layer) pair, "
            "e.g. default_layer_map(student_layers, teacher_layers)"
        )
    for s, t in pairs:
        if not (0 <= s <= student_layers and 0 <= t <= teacher_layers):
            raise ValueError(
                f"layer pair ({s}, {t}) is out of range: student layers are 0..{student_layers}, teacher "
                f"layers 0..{teacher_layers} (0 = embeddings, i = after block i)"
            )
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"layer_map {pairs} repeats a pair")
    return pairs


def pair_key(student_layer: int, teacher_layer: int) -> str:
    return f"s{student_layer}_t{teacher_layer}"  # nn.ModuleDict keys cannot contain dots


def build_projections(layer_map: list[tuple[int, int]], student_width: int, teacher_width: int) -> nn.ModuleDict:
    """One projection per pair: a learned bias-free ``nn.Linear`` where widths differ, identity where equal."""

    def projection() -> nn.Module:
        return nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width, bias=False)

    return nn.ModuleDict({pair_key(s, t): projection() for s, t in layer_map})


@dataclass
class FeatureKDConfig(SFTConfig):
    """SFTConfig and the feature loss's settings (the recipe's ``kd.feature``): ``loss = CE + feature_weight ·``
    mean over ``feature_layers`` pairs of ``feature_loss`` between projected student and teacher hidden states."""

    feature_layers: list[tuple[int, int]] | None = field(
        default=None,
        metadata={"help": "(student layer, teacher layer) pairs of hidden_states indices; None: spread evenly"},
    )
    feature_loss: FeatureLossKind = field(default=FeatureLossKind.mse, metadata={"help": "mse or cosine"})
    feature_weight: float = field(default=1.0, metadata={"help": "weight of the feature term, > 0"})

    def __post_init__(self):
        self.feature_loss = FeatureLossKind(self.feature_loss)
        values = {"layers": self.feature_layers, "kind": self.feature_loss.value, "weight": self.feature_weight}
        check_settings(type(self).__name__, FeatureLoss, values, prefix="feature_")
        super().__post_init__()


class FeatureKDTrainer(SFTTrainer):
    """SFTTrainer whose loss adds ``weight ·`` a hidden-state distance to a live teacher to the completion CE.

    The projections are attached to the student as a submodule (``student.feature_projections``) before the
    Trainer is built. That one step makes everything the Trainer does to the model also happen to them:
    moved to the device, seen by the optimizer and the LR schedule, clipped with the model's gradients,
    synchronised by DDP, stored in checkpoints (so a resumed run restores them with the student).
    Overriding ``create_optimizer`` instead would cover only the optimizer. When ``train`` returns they are
    detached again (still at ``trainer.projections``), so the student saves as a plain causal LM.
    """

    def __init__(self, model, teacher_model, *, args: FeatureKDConfig, **kwargs):
        layers = (model.config.num_hidden_layers, teacher_model.config.num_hidden_layers)
        given = args.feature_layers
        self.layer_map = check_layer_map(default_layer_map(*layers) if given is None else given, *layers)
        self.kind, self.weight = args.feature_loss, args.feature_weight
        self.projections = build_projections(self.layer_map, model.config.hidden_size, teacher_model.config.hidden_size)
        self.projections.to(dtype=model.dtype, device=model.device)
        setattr(model, PROJECTIONS, self.projections)
        super().__init__(model=model, args=args, **kwargs)
        # The teacher is only ever read: frozen, in eval mode (no dropout), placed like the student.
        teacher_model.requires_grad_(False)
        self.teacher = self.accelerator.prepare_model(teacher_model.eval(), evaluation_mode=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        # The model's plain forward (not TRL's fused LM head, which returns no hidden states): one student pass
        # gives both the logits for the CE and the hidden states for the feature term.
        outputs = model(**forward, output_hidden_states=True, use_cache=False)
        with torch.no_grad():
            teacher_hidden = self.teacher(**forward, output_hidden_states=True, use_cache=False).hidden_states
        ce = cross_entropy(outputs.logits[:, :-1], labels[:, 1:])  # logits at i predict token i + 1
        mask = labels != IGNORE_INDEX  # completion tokens: prompt and padding carry no label
        features = torch.stack(
            [
                feature_loss(
                    outputs.hidden_states[s], teacher_hidden[t], self.projections[pair_key(s, t)], mask, self.kind
                )
                for s, t in self.layer_map
            ]
        ).mean()  # mean over pairs: ``weight`` means the same for 1 or 6 pairs
        mode = "train" if model.training else "eval"
        self._metrics[mode]["ce_loss"].append(ce.item())  # SFTTrainer.log averages these per logging step
        self._metrics[mode]["feature_loss"].append(features.item())
        loss = (ce + self.weight * features) * self._share_of_batch(labels, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _share_of_batch(self, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor | float:
        """This micro-batch's share of the tokens the optimizer step averages over.

        The Trainer counts the labelled tokens of all the step's micro-batches (``num_items_in_batch``) and then
        does not divide by the accumulation steps itself, expecting a loss summed over tokens / that count, as
        SFTTrainer's. Both terms here are per-token means, so they are weighted by their token share; and, as
        in SFTTrainer, multiplied by the number of processes when the count is summed across them.
        """
        if num_items_in_batch is None:
            return 1.0
        share = (labels[:, 1:] != IGNORE_INDEX).sum() / torch.as_tensor(num_items_in_batch).clamp(min=1)
        if self.args.average_tokens_across_devices:
            share = share * self.accelerator.num_processes
        return share

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # also after an interruption: a caller may save what it has, and it must be a plain causal LM
            model = self.accelerator.unwrap_model(self.model)
            if hasattr(model, PROJECTIONS):
                delattr(model, PROJECTIONS)


def train_feature_kd(
    student, teacher, tokenizer, rows: list[dict], config: FeatureKDConfig, out_dir: Path, callbacks: list | None = None
) -> list[dict]:
    """Train ``student`` in place with CE + feature KD from ``teacher`` on prompt-completion ``rows``, as
    ``config`` says (``feature_layers`` None maps the layers uniformly: ``default_layer_map``).

    Checkpoints hold the projections too, so a resumed run continues with them. Saves the student (a plain causal
    LM, without the projections) and the tokenizer to ``out_dir/"model"``; returns the log history (with
    ``ce_loss`` and ``feature_loss`` per logging step), also written to ``out_dir/"log_history.json"``.
    """
    from datasets import Dataset, disable_progress_bars

    from kdflow.training.sft import fit

    disable_progress_bars()
    trainer = FeatureKDTrainer(
        student,
        teacher,
        args=config,
        train_dataset=Dataset.from_list(plain_rows(rows, tokenizer)),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return fit(trainer, student, tokenizer, out_dir)
