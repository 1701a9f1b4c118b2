"""What a model is trained as: a fresh Llama's size, and the training keywords passed through to TRL's ``SFTConfig``
(checked here for types, ranges and secrets, then by TRL itself), shared by the teacher and student sections."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from kdflow.config.fields import Strict
from kdflow.config.loading import NOT_FINITE, FieldError, e_notation_hint


class Architecture(Strict):
    hidden: int = Field(ge=8)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    intermediate: int = Field(ge=8)

    @model_validator(mode="after")
    def _head_dim(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.hidden // self.heads not in (32, 64, 128):
            raise ValueError(
                f"head dimension hidden/heads = {self.hidden // self.heads}; use 32, 64 or 128 "
                "(vLLM's CPU attention rejects 16)"
            )
        return self


# Training keys that hold credentials. A recipe's sections reach cache keys, manifests and Prefect's records, so a
# secret has no place in one: the Hub token comes from the environment, where transformers looks for it anyway.
SECRET_TRAINING_KEYS = {"hub_token": "set HF_TOKEN in the environment (or run `hf auth login`) instead"}

# Ranges the config classes leave unchecked until training fails (or silently trains on: max_steps -5).
TRAINING_RANGES = {
    "learning_rate": (lambda v: v > 0, "must be > 0 (e.g. 3.0e-4)"),
    "num_train_epochs": (lambda v: v > 0, "must be > 0"),
    "max_steps": (lambda v: v == -1 or v > 0, "must be a positive number of steps (or -1: train num_train_epochs)"),
    "per_device_train_batch_size": (lambda v: v >= 1, "must be >= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "must be >= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "must be >= 1"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "max_length": (lambda v: v >= 1, "must be >= 1 (tokens)"),
}


def _scalar_types(annotation) -> tuple[set[type], bool] | None:
    """({int}, {float} or {bool}, None allowed) for a config field typed as a plain scalar; None otherwise."""
    args = (
        typing.get_args(annotation)
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        else (annotation,)
    )
    scalars = {a for a in args if a in (int, float, bool)}
    if not scalars or any(a not in (int, float, bool, type(None)) for a in args):
        return None
    return scalars, type(None) in args


def _value_ok(value, scalars: set[type]) -> bool:
    if isinstance(value, bool):
        return bool in scalars
    if isinstance(value, int):
        return int in scalars or float in scalars
    return isinstance(value, float) and float in scalars


def _non_finite(value, *loc) -> tuple | None:
    """The path to the first float in ``value`` (a scalar, or dicts and lists of them) that is inf or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return loc
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next((found for k, v in items if (found := _non_finite(v, *loc, k)) is not None), None)


def check_training_values(training: dict[str, Any], config_class) -> None:
    """Types and ranges of the numeric knobs, which the config dataclasses take without checking: "abc" as a
    learning rate fails only when the optimizer starts; YAML reads 3e-4 (no dot) as text. No float anywhere in
    them may be inf or NaN (``learning_rate: .inf`` trained every weight to NaN, and the run was marked done)."""
    for key, fix in SECRET_TRAINING_KEYS.items():
        if key in training:
            raise FieldError(f"remove it: a secret in a recipe reaches cache keys, manifests and logs; {fix}", key)
    if (loc := _non_finite(training)) is not None:
        value = training
        for part in loc:
            value = value[part]
        raise FieldError(NOT_FINITE.format(value=value), *loc)
    fields = {f.name: f.type for f in dataclasses.fields(config_class)}
    for key, value in training.items():
        typed = _scalar_types(fields.get(key))
        if typed is not None and not (value is None and typed[1]) and not _value_ok(value, typed[0]):
            want = " or ".join(sorted(t.__name__ for t in typed[0]))
            hint = e_notation_hint(value, whole=float not in typed[0])  # a float of an int's value is no int either
            raise FieldError(f"{value!r} is not a {want}{f' ({hint})' if hint else ''}", key)
        if key in TRAINING_RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            ok, rule = TRAINING_RANGES[key]
            if not ok(value):
                raise FieldError(f"{value!r}: {rule}", key)


# The TRL config every trainer builds from a recipe's `training:` keys (kdflow/training/ builds it; here it is
# also built once when a recipe loads, so that TRL validates the keys before any work).
DEFAULTS = dict(save_strategy="no", logging_steps=25, report_to=[], disable_tqdm=True)
# With a checkpoint folder: a checkpoint every 10 % of the steps (a float < 1 is a fraction of the total),
# only the newest kept. An interrupted run resumes from it instead of starting over.
CHECKPOINTING = dict(save_strategy="steps", save_steps=0.1, save_total_limit=1)
# TRL turns bf16 and gradient checkpointing on by default; on a CPU both are wrong (bf16 is refused
# outright), so without a GPU these win over the recipe. A GPU recipe keeps its own settings there.
CPU_OVERRIDES = dict(use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False)


def sft_config(
    training: dict, output_dir: str, seed: int, cpu: bool, checkpoints: bool = False, config_class=None, **fixed
):
    """A TRL config from a recipe's ``training`` keys (TRL validates them: unknown keys, bad values).

    ``config_class``: SFTConfig unless given (GKD and GOLD have their own); ``fixed``: settings a trainer
    needs whatever the recipe says.
    """
    import warnings

    from trl import SFTConfig

    base = {**DEFAULTS, **(CHECKPOINTING if checkpoints else {})}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        return (config_class or SFTConfig)(
            output_dir=output_dir, seed=seed, **{**base, **training, **(CPU_OVERRIDES if cpu else {}), **fixed}
        )


def trainer_config(
    training: dict, out_dir: Path, seed: int, checkpoints: Path | None = None, config_class=None, **settings
):
    """The TRL config a kdflow trainer runs on: the recipe's ``training`` keys and a method's own ``settings``
    (fields of ``config_class``, SFTConfig unless given), for training into ``out_dir`` on this machine.

    ``checkpoints``: a folder that outlives a failed attempt, checkpointed into and resumed from (it becomes the
    config's ``output_dir``); without one nothing is checkpointed."""
    import torch

    output_dir = str(checkpoints or Path(out_dir) / "checkpoints")
    cpu = not torch.cuda.is_available()
    return sft_config(training, output_dir, seed, cpu, checkpoints is not None, config_class, **settings)


def check_sft_config(training: dict[str, Any]) -> dict[str, Any]:
    """Let TRL validate the knobs: build the SFTConfig now, before any work (hardware settings aside,
    so that a GPU recipe validates on a CPU machine too)."""
    from trl import SFTConfig

    reserved = {"output_dir", "seed", "use_cpu"} & set(training)
    if reserved:
        raise ValueError(f"remove {sorted(reserved)}: kdflow sets them (the seed is the section's own `seed`)")
    check_training_values(training, SFTConfig)
    try:
        sft_config(training, "/tmp/kdflow-validate", seed=0, cpu=True)
    except TypeError as e:  # unknown keyword
        raise ValueError(f"{e}; see trl.SFTConfig for the accepted keys") from None
    except ValueError as e:
        raise ValueError(f"TRL rejected these settings: {e}") from None
    return training
