"""``dtype``: the precision a model is loaded, trained, captured or evaluated in — one enum for the teacher, students,
logit_cache and evaluation sections. Unset (the default) means float32 weights, and TRL's own mixed-precision
defaults on a GPU; a default is left out of a section's cache key (``canonical`` in kdflow/store/outputs.py)."""

from __future__ import annotations

import enum
from typing import Any

from pydantic import Field


class Dtype(str, enum.Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"

    def torch(self):
        import torch

        return getattr(torch, self.value)


def dtype_field(what: str):
    return Field(None, description=f"bfloat16, float16 or float32: {what}; unset: float32")


# TRL's mixed-precision flags for each dtype: bf16 weights train under bf16 autocast; fp16 trains fp32 master
# weights under fp16 autocast with loss scaling (the scaler refuses fp16 gradients); float32 turns both off.
PRECISION_FLAGS = {
    Dtype.bfloat16: {"bf16": True, "fp16": False},
    Dtype.float16: {"bf16": False, "fp16": True},
    Dtype.float32: {"bf16": False, "fp16": False},
}


def check_precision(dtype: Dtype | None, training: dict[str, Any]) -> None:
    """A ``training:`` bf16/fp16 flag that contradicts the section's ``dtype`` is an error naming both, before any
    work (the recipe loader prefixes the section's path)."""
    if dtype is None:
        return
    for flag, wanted in PRECISION_FLAGS[dtype].items():
        if flag in training and bool(training[flag]) != wanted:
            raise ValueError(
                f"training.{flag}: {training[flag]} contradicts dtype: {dtype.value}, which sets "
                f"{flag} to {wanted}; remove training.{flag} (dtype decides the precision)"
            )


def training_flags(dtype: Dtype | None) -> dict[str, bool]:
    """The TRL config flags ``dtype`` sets (none when unset: the recipe's ``training:`` and TRL's defaults)."""
    return {} if dtype is None else dict(PRECISION_FLAGS[dtype])


def weights_dtype(dtype: Dtype | None):
    """The torch dtype a model's weights are created or loaded in to be trained as ``dtype``; None when unset (a
    fresh model stays float32, a pretrained one loads as transformers does by default)."""
    import torch

    return None if dtype is None else torch.bfloat16 if dtype is Dtype.bfloat16 else torch.float32


def check_trainable_here(dtype: Dtype | None, section: str) -> None:
    """fp16 training needs loss scaling, which Trainer runs only on a CUDA GPU: refuse it on a CPU, before work."""
    import torch

    if dtype is Dtype.float16 and not torch.cuda.is_available():
        raise ValueError(
            f"{section}.dtype float16: fp16 training needs a CUDA GPU (loss scaling) and none is here; "
            "use bfloat16 (trains on a CPU) or float32"
        )


def load_dtype(dtype: Dtype | None):
    """The torch dtype a model is loaded in for capture or evaluation (float32 when unset, as before)."""
    import torch

    return torch.float32 if dtype is None else dtype.torch()
