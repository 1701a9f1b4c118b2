"""The ``teacher`` section: an existing model folder, a fresh one to train on the teacher split, or (``api: true``)
the model ``generation.api`` names, whose weights this machine never sees (black-box distillation)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from kdflow.config.fields import ROOT, Strict
from kdflow.config.precision import Dtype, check_precision, dtype_field
from kdflow.config.training import Architecture, check_sft_config
from kdflow.models.gguf import inspect_gguf, is_gguf_path, layer_count, mlp_width, vocab_count
from kdflow.models.model_folder import NOT_THERE, folder_problem, maybe_hub_id


class TeacherSection(Strict):
    api: bool = Field(
        False,
        description="the teacher is the model generation.api names (backend openai): nothing "
        "is trained or loaded here; students learn from its verified answers",
    )
    imported: bool = Field(
        False,
        description="the teacher is the model that made the imported logit dataset (logit_cache.import), whose "
        "weights are not here: nothing is trained, loaded or evaluated for it; students with a model of their own "
        "train from the file, and the report measures them against each other",
    )
    model: str | None = Field(
        None,
        description="an existing model folder, hub id or GGUF file (imported once into "
        "a Hugging Face folder in `dtype`, float32 by default): skips teacher training",
    )
    architecture: Architecture | None = None
    # The BPE trainer allocates for the whole vocabulary up front: 1e9 asked it for 70 GB and aborted the process.
    # 1,048,576 is four times the largest vocabulary of today's open models.
    vocab_size: int = Field(
        64, ge=16, le=1_048_576, description="BPE size of the locally trained shared tokenizer (16 to 1,048,576)"
    )
    seed: int = 0
    training: dict[str, Any] = Field(default_factory=dict, description="trl.SFTConfig keyword arguments")
    dtype: Dtype | None = dtype_field("the teacher's weights and training precision when it is trained here")

    @field_validator("training")
    @classmethod
    def _training(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_sft_config(v)

    @model_validator(mode="after")
    def _train_or_load(self):
        if self.imported:
            # every field the recipe sets, not only the truthy ones: vocab_size and seed (and api: false) were
            # accepted and did nothing, an imported teacher being neither trained, loaded nor asked
            local = [f for f in TeacherSection.model_fields if f in self.model_fields_set and f != "imported"]
            if local:
                raise ValueError(
                    f"teacher.imported: true says the teacher is not here (only its logits, in logit_cache.import); "
                    f"remove teacher.{local[0]} (or set imported: false to train, load or ask a teacher)"
                )
            return self
        if self.api:
            local = [f for f in ("model", "architecture", "training", "dtype") if getattr(self, f)]
            if local:
                raise ValueError(
                    f"teacher.api: true makes the API model the teacher; remove teacher.{local[0]} "
                    "(or set api: false to train or load a local teacher)"
                )
            return self
        if self.model is None and self.architecture is None:
            raise ValueError(
                "set teacher.model (an existing model folder), teacher.architecture (to train one), "
                "teacher.api: true (the model generation.api names) or teacher.imported: true (only its logits, "
                "in logit_cache.import)"
            )
        if is_gguf_path(self.model):
            inspect_gguf(ROOT / self.model)  # not GGUF, truncated, an architecture transformers cannot load: fail now
        elif self.model is not None and not (ROOT / self.model).exists() and not maybe_hub_id(self.model):
            raise ValueError(
                f"teacher.model {self.model!r}: {NOT_THERE}; point it at a "
                "model folder (one with config.json), a .gguf file, or a hub id"
            )
        elif self.model is not None and (ROOT / self.model).exists():
            problem = folder_problem(ROOT / self.model)  # no config, weights or tokenizer; a foreign tokenizer
            if problem:
                raise ValueError(f"teacher.model {self.model!r}: {problem}")
        check_precision(self.dtype, self.training)
        return self

    def layer_count(self) -> int | None:
        """The teacher's decoder layers where known before any work (an architecture to train, a model folder, a GGUF
        file); None for a hub id."""
        if self.architecture is not None:
            return self.architecture.layers
        return layer_count(str(ROOT / self.model)) if self.model else None

    def vocab(self) -> int | None:
        """The teacher's vocabulary where known before any work: at most ``vocab_size`` for a tokenizer trained here
        (the BPE target), a model folder's or GGUF file's own; None for a hub id."""
        if self.architecture is not None:
            return self.vocab_size
        return vocab_count(str(ROOT / self.model)) if self.model else None

    def mlp_width(self) -> int | None:
        """The teacher's MLP channels per layer (``intermediate_size``), where known as ``layer_count`` is."""
        if self.architecture is not None:
            return self.architecture.intermediate
        return mlp_width(str(ROOT / self.model)) if self.model else None
