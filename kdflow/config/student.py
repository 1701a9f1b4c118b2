"""A ``students`` entry: how one student starts (a pretrained model or a fresh architecture), what it learns from
(gold rationales or the teacher's answers, with white-box KD on top), and optionally LoRA or ``accelerate launch``."""

from __future__ import annotations

import enum
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationInfo, computed_field, field_validator, model_validator

from kdflow.config.fields import PATH_RULE, ROOT, SAFE_NAME_FIX, Strict, check_name, resolve
from kdflow.config.kd import FeatureKD, KDSection, OnlineKD, OnPolicyKD
from kdflow.config.precision import Dtype, check_precision, dtype_field
from kdflow.config.training import Architecture, check_sft_config
from kdflow.models.gguf import inspect_gguf, is_gguf_path
from kdflow.models.model_folder import NOT_THERE, folder_problem, maybe_hub_id
from kdflow.models.pruning import LayerSelect


def _student_name(name: str) -> str:
    # run.seeds trains `<name>@<seed>` (Recipe.student_runs), and a launched student's section is read back
    # under that name (tasks/students.py StudentJob), so the seed suffix is part of the safe set here.
    base, at, seed = name.partition("@")
    check_name(base, "student name")
    if at and not re.fullmatch(r"-?\d+", seed):
        raise ValueError(f"student name {name!r}: '@' is followed by the seed only; {SAFE_NAME_FIX}")
    return name


StudentName = Annotated[str, AfterValidator(_student_name)]


class StudentData(str, enum.Enum):
    gold = "gold"  # SFT on the gold rationales of the train split: the baseline
    teacher = "teacher"  # SFT on the teacher's kept answers (sequence-level KD)


class LoraSection(Strict):
    """LoRA (Hu et al. 2021) through peft: the pretrained student's weights stay frozen and a low-rank update
    ``(alpha / r) · B·A`` is learned beside each targeted linear layer. On save the update is merged into the
    base weights, so the student's model folder is a plain causal LM; the adapter alone is kept in ``adapter/``."""

    r: int = Field(16, ge=1, description="rank of the update")
    alpha: float = Field(32.0, gt=0.0, description="the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="'all-linear': every linear layer but the LM head (peft's shorthand); or module "
        "names, e.g. [q_proj, v_proj] (Llama: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)",
    )

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError(
                    "an empty list adapts nothing: name modules (e.g. [q_proj, v_proj]) or use 'all-linear'"
                )
            bad = [n for n in v if not re.fullmatch(r"[A-Za-z_][\w.]*", n)]
            if bad:
                raise ValueError(f"{bad} are not module names; use names such as q_proj, v_proj, or 'all-linear'")
        return v


class PrunedInit(Strict):
    """Start from the teacher with a subset of its decoder layers (depth pruning, as Minitron and ShortGPT): the
    pruned copy is made once per (teacher, init) by the prune stage, evaluated untrained as the floor of the
    report, and every student naming the same init starts from it."""

    from_: Literal["teacher"] = Field(alias="from", description="the model pruned: the run's teacher")
    layers: int = Field(ge=1, description="decoder layers kept (the teacher's count or fewer)")
    select: LayerSelect = Field(
        LayerSelect.every_other,
        description="every_other: evenly spaced layers "
        "(floor(i*n/k)); importance: the layers with the largest ShortGPT block influence "
        "(1 - cos(layer input, layer output)) on calibration rows of the train split",
    )
    calibration_rows: int = Field(
        64,
        ge=1,
        le=10_000,
        description="importance or mlp_width: train-split rows (prompt and "
        "reference through the chat template) the importance is averaged over",
    )
    calibration_max_length: int = Field(256, ge=8, le=8192, description="tokens per calibration row")
    mlp_width: int | None = Field(
        None,
        ge=1,
        description="width pruning (Minitron): MLP channels kept in every kept layer — the pruned model's "
        "intermediate_size (NeMo's ffn_hidden_size), at most the teacher's; the channels with the largest "
        "activation importance on the calibration rows stay. Unset: every channel",
    )

    def summary(self) -> dict:
        width = "" if self.mlp_width is None else f", MLP width {self.mlp_width}"
        return {"init": f"pruned from the teacher: {self.layers} layers, {self.select.value}{width}"}

    @property
    def calibrated(self) -> bool:
        """Whether the pruning is measured on calibration rows (layer importance, or MLP channels)."""
        return self.select is LayerSelect.importance or self.mlp_width is not None

    @property
    def label(self) -> str:
        """The untrained pruned model's name in the report."""
        width = "" if self.mlp_width is None else f"-mlp{self.mlp_width}"
        return f"pruned-{self.layers}-{self.select.value.replace('_', '-')}{width}"


class StudentInit(Strict):
    """Start from another student's trained weights: staged distillation, e.g. offline KD or seq-KD first and
    on-policy KD after it, as GKD and on-policy distillation recipes warm-start. A student sampling its own answers
    from an untrained pruned copy writes text the teacher would never write, and the teacher's scores of it teach
    little; starting from a student that already writes the teacher's kind of answer gives on-policy KD something
    to correct. The parent is listed before this student; with run.seeds, ``<name>@<seed>`` starts from
    ``<student>@<seed>``."""

    from_: Literal["student"] = Field(alias="from", description="the model started from: another student's")
    student: StudentName = Field(description="the student whose trained model this one starts from (listed before it)")

    def summary(self) -> dict:
        # ``starts_from``: what it learnt before is in its weights, so it is nobody's baseline (reporting/run_report.py)
        return {"init": f"from the trained student {self.student}", "starts_from": self.student}


class LaunchSection(Strict):
    """Train the student in processes of its own, started by ``accelerate launch`` (e.g. DDP over a node's GPUs),
    instead of inside the stage's process. The number of processes multiplies the global batch, so it and the
    config's text are part of the student's key."""

    accelerate_config: str = Field(
        description="an accelerate config file, relative to the repo (e.g. accelerate/multi_gpu.yaml) or absolute"
    )
    num_processes: int | None = Field(
        None, ge=1, description="overrides the config's num_processes (e.g. the node's GPU count)"
    )

    @field_validator("accelerate_config")
    @classmethod
    def _exists(cls, v: str, info: ValidationInfo) -> str:
        v = resolve(v, info)
        if not (ROOT / v).is_file():  # an absolute path stays absolute under ROOT / v
            raise ValueError(
                f"no accelerate config at {ROOT / v} ({PATH_RULE}): use "
                "accelerate/multi_gpu.yaml, accelerate/cpu_2proc.yaml, or a file written by "
                "`accelerate config`"
            )
        return v

    @model_validator(mode="after")
    def _process_count(self):
        config = yaml.safe_load(self.config_text) or {}
        if self.num_processes is None and config.get("num_processes", -1) == -1:
            raise ValueError(
                f"{self.accelerate_config} leaves the number of processes to you: set "
                "launch.num_processes (e.g. the node's GPU count)"
            )
        return self

    @computed_field  # in model_dump, hence in the key: editing the config (e.g. mixed precision) retrains
    @property
    def config_text(self) -> str:
        return (ROOT / self.accelerate_config).read_text()

    @property
    def config_path(self) -> Path:
        return ROOT / self.accelerate_config


class StudentSection(Strict):
    name: StudentName = Field(description="names the student in the report (and `<name>@<seed>` with run.seeds)")
    data: StudentData
    kd: KDSection | None = Field(None, description="white-box KD on top of the student's data (data: teacher)")
    data_fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="train on this share of the student's rows: a "
        "subset fixed by the seed, the same for every method (transfer-set sweeps)",
    )
    model: str | None = Field(None, description="a pretrained model folder, hub id or GGUF file to fine-tune")
    architecture: Architecture | None = Field(None, description="or: a fresh Llama of this size, teacher's tokenizer")
    init: Annotated[PrunedInit | StudentInit, Field(discriminator="from_")] | None = Field(
        None,
        description="or: the teacher with a subset of its layers, e.g. {from: teacher, layers: 15, select: "
        "importance}; or another student's trained model, e.g. {from: student, student: offline-kd}",
    )
    seed: int = 0
    curve_points: int = Field(
        0,
        ge=0,
        le=100,
        description="save the weights at this many evenly spaced steps (the "
        "last: the finished model) for a learning curve (kdflow/training/curves.py); 0: none",
    )
    training: dict[str, Any] = Field(default_factory=dict, description="trl.SFTConfig keyword arguments")
    lora: LoraSection | None = Field(None, description="train LoRA adapters on the pretrained `model` (peft)")
    launch: LaunchSection | None = Field(None, description="train through `accelerate launch` (multi-GPU)")
    dtype: Dtype | None = dtype_field("the student's weights and training precision (and an online teacher's)")

    @field_validator("training")
    @classmethod
    def _training(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_sft_config(v)

    def summary(self) -> dict:
        """What the report says of how this student was trained."""
        out = {"data": self.data.value, "seed": self.seed}
        if self.data_fraction < 1.0:
            out["data_fraction"] = self.data_fraction
        if self.kd is not None:
            out |= self.kd.summary()
        if self.init is not None:
            out |= self.init.summary()
        if self.lora is not None:
            out["lora_r"] = self.lora.r
        if self.dtype is not None:
            out["dtype"] = self.dtype.value
        # For the report's baseline (reporting/baseline.py): the starting weights, and how the training ran. A gold
        # student is a KD student's baseline only from the same weights, and preferably trained the same way.
        if self.model is not None:
            out["start"] = f"model {self.model}"
        elif self.architecture is not None:
            out["start"] = "fresh " + json.dumps(self.architecture.model_dump(mode="json"), sort_keys=True)
        how = {"training": self.training, "lora": None if self.lora is None else self.lora.model_dump(mode="json")}
        if self.dtype is not None:  # a bf16 student is measured against a bf16 baseline before an fp32 one
            how["dtype"] = self.dtype.value
        out["training_digest"] = hashlib.sha256(json.dumps(how, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return out

    @model_validator(mode="after")
    def _one_init(self):
        starts = [f for f in ("model", "architecture", "init") if getattr(self, f) is not None]
        if len(starts) != 1:
            raise ValueError(
                f"set exactly one of model (fine-tune a pretrained student), architecture (a fresh one) "
                f"or init (pruned from the teacher, or a trained student); "
                f"{'got ' + ' and '.join(starts) if starts else 'none is set'}"
            )
        if self.lora is not None:
            self._check_lora()
        if is_gguf_path(self.model):
            inspect_gguf(ROOT / self.model)  # not GGUF, truncated, an architecture transformers cannot load: fail now
        elif self.model is not None and (ROOT / self.model).exists():
            problem = folder_problem(ROOT / self.model)
            if problem:
                raise ValueError(f"model {self.model!r}: {problem}")
        elif self.model is not None and not maybe_hub_id(self.model):
            raise ValueError(
                f"model {self.model!r}: {NOT_THERE}; point it at a model folder "
                "(one with config.json), a .gguf file, or a hub id"
            )
        check_precision(self.dtype, self.training)
        if self.launch is not None and isinstance(self.kd, OnPolicyKD) and self.kd.base_url is None:
            raise ValueError(
                "launch with kd method on_policy: every launched process would start a teacher of its "
                "own; serve the teacher once (vLLM) and set kd.teacher_backend: vllm with kd.base_url"
            )
        return self

    def _check_lora(self) -> None:
        if self.architecture is not None:
            raise ValueError(
                "lora: adapters train beside frozen pretrained weights, and a fresh `architecture:` "
                "student has none worth freezing: set `model:` to a pretrained model folder (or hub "
                "id) instead of `architecture:`, or remove `lora:` to train every weight"
            )
        kd = self.kd
        if isinstance(kd, FeatureKD):
            raise ValueError(
                "lora with kd method feature: peft would freeze the learned feature projections "
                "with the base weights; remove `lora:`, or use kd method offline or online"
            )
        if isinstance(kd, OnlineKD) and kd.cross_tokenizer is not None:
            raise ValueError(
                "lora with kd.cross_tokenizer gold is not supported yet; remove `lora:` to train "
                "the whole student with GOLD"
            )
