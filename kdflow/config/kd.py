"""A student's ``kd`` section: white-box KD on top of its data, one model per method, told apart by ``method``.

Each method takes only its own settings (``extra="forbid"``): ``lmbda`` on an offline student, or ``alpha`` on an
online one, is an error that names the method, not a setting silently ignored. ``method`` may be left out and
means ``offline``, as it did when one section served every method; the field names and defaults are those of that
section, so that a recipe written for it keys its students the same (``kdflow.store.outputs.canonical``).

The section is what keys a student; its trainer takes one config object of TRL's kind (``OfflineKDConfig``,
``OnPolicyConfig``, ``FeatureKDConfig`` in kdflow/training/, TRL's ``GKDConfig`` and ``GOLDConfig``), built from it in
one place (``kdflow.training.student.fit_student``). Those configs check their settings with these models
(``check_settings``), so each range is written once, here.

``Divergence`` lives here rather than beside the losses (kdflow/training/losses.py imports it), so that loading a
recipe does not import torch.
"""

from __future__ import annotations

import enum
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from kdflow.config.fields import Strict, redact_url
from kdflow.config.loading import FieldError


class Divergence(str, enum.Enum):
    """D(teacher ‖ student) for white-box KD, over a shared class axis. ``p`` = teacher, ``q`` = student.

    - ``forward_kl``: ``KL(p ‖ q)``, mean-seeking (Hinton's term);
    - ``reverse_kl``: ``KL(q ‖ p)``, mode-seeking (MiniLLM);
    - ``jsd``: generalized JSD(β) = ``β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)``, ``m = β·p + (1 − β)·q``, as in TRL's
      GKD (so offline and online KD mean the same thing by β): β = 0 is taken as forward KL and β = 1 as
      reverse KL, the limits of JSD(β) / β and JSD(β) / (1 − β);
    - ``skew_kl``: ``KL(p ‖ λ·p + (1 − λ)·q)`` and ``skew_reverse_kl``: ``KL(q ‖ λ·q + (1 − λ)·p)``
      (DistiLLM, Ko et al. 2024): λ = 0 gives KL / reverse KL, and the mixture keeps the loss finite where
      the student gives ~0 mass;
    - ``tv``: total variation, ``½ Σ |p − q|``.
    """

    forward_kl = "forward_kl"
    reverse_kl = "reverse_kl"
    jsd = "jsd"
    skew_kl = "skew_kl"
    skew_reverse_kl = "skew_reverse_kl"
    tv = "tv"


# The softmax temperatures a KD method takes (``softmax(z / T)``). Beyond them nothing useful is left and the
# arithmetic breaks without a word: as T -> 0, z / T overflows (the loss turns NaN); as T grows, both sides tend to
# uniform and offline KD's T² factor multiplies rounding noise (at T = inf every weight trained to NaN). Hinton et al.
# used T up to 20 (so does recipes/classifier-digits.yaml's sweep); T = 0.01 samples all but greedily.
TEMPERATURES = (0.01, 50.0)


def _temperature(t: float) -> float:
    low, high = TEMPERATURES
    if not low <= t <= high:
        raise ValueError(f"{t!r}: a softmax temperature must be in [{low}, {high}]; use e.g. 1.0")
    return t


Temperature = Annotated[float, AfterValidator(_temperature)]


class KDMethod(str, enum.Enum):
    offline = "offline"  # white-box KD from the logit cache: no teacher in memory (kdflow/training/offline_kd.py)
    online = "online"  # TRL's GKD with the live teacher: on-policy fraction lmbda, JSD(beta), temperature
    feature = "feature"  # hidden-state KD with the live teacher, added to the language-modelling loss
    on_policy = "on_policy"  # the student samples, a teacher out of process scores those tokens (training/on_policy.py)


class OfflineKD(Strict):
    """``alpha · CE(teacher's tokens) + (1 − alpha) · T² · D(teacher ‖ student)`` at temperature T, the teacher's
    side read from the logit cache."""

    method: Literal[KDMethod.offline] = KDMethod.offline
    divergence: Divergence = Divergence.forward_kl
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the cross-entropy term; 1 - alpha on KD")
    temperature: Temperature = Field(1.0, description="softmax(z / T) on both sides, the KD term scaled by T²")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD's β (divergence jsd)")
    skew: float = Field(0.1, ge=0.0, lt=1.0, description="λ of skew_kl / skew_reverse_kl")

    def summary(self) -> dict:
        return {
            "kd": self.method.value,
            "divergence": self.divergence.value,
            "alpha": self.alpha,
            "temperature": self.temperature,
        }


class OnlineKD(Strict):
    """TRL's GKD against the live teacher: JSD(beta) on a mix of the student's own samples (a fraction ``lmbda``
    of batches) and the teacher's answers; with ``cross_tokenizer: gold``, TRL's GOLD for another tokenizer."""

    method: Literal[KDMethod.online]
    # GKD's loss is always JSD(beta); the recipe still says so, and it stays in the key as it always was.
    divergence: Divergence = Field(description="jsd: TRL's GKD trains with JSD(beta)")
    temperature: Temperature = Field(1.0, description="the student's sampling temperature")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD's β: 0 = forward KL, 1 = reverse KL")
    lmbda: float = Field(0.5, ge=0.0, le=1.0, description="the fraction of batches the student generates")
    max_new_tokens: int = Field(128, ge=1, description="tokens the student generates per on-policy sample")
    cross_tokenizer: Literal["gold"] | None = Field(
        None,
        description="gold: TRL's GOLD (cross-tokenizer ULD) where the student's tokenizer differs from the teacher's",
    )

    @field_validator("divergence")
    @classmethod
    def _jsd(cls, v: Divergence) -> Divergence:
        if v is not Divergence.jsd:
            raise ValueError(
                f"method online trains with TRL's GKD, whose loss is JSD(beta): set divergence: jsd "
                f"(beta 0 = forward KL, 1 = reverse KL), not {v.value}"
            )
        return v

    def summary(self) -> dict:
        return {
            "kd": self.method.value,
            "divergence": self.divergence.value,
            "beta": self.beta,
            "lmbda": self.lmbda,
            "temperature": self.temperature,
        }


class FeatureLoss(Strict):
    layers: list[tuple[int, int]] | None = Field(
        None,
        description="(student layer, teacher layer) pairs of "
        "hidden_states indices (0 = embeddings); default: spread evenly",
    )
    kind: Literal["mse", "cosine"] = "mse"
    weight: float = Field(1.0, gt=0.0)


class FeatureKD(Strict):
    """The language-modelling loss plus ``weight ·`` a loss between projected student and teacher hidden states
    (kdflow/training/feature_kd.py)."""

    method: Literal[KDMethod.feature]
    feature: FeatureLoss = Field(description="the layer mapping and its loss; `feature: {}` takes the defaults")

    def summary(self) -> dict:
        return {"kd": self.method.value, "feature": self.feature.kind, "weight": self.feature.weight}


class OnPolicyKD(Strict):
    """On-policy distillation (GKD, Agarwal et al. 2024; MiniLLM, Gu et al. 2024) with the teacher out of the
    training process: each step the student samples completions of a batch of prompts at ``temperature``, the
    teacher scores exactly those tokens (its top-``k`` at every completion position, from an HF teacher in a
    process of its own or a vLLM server's prompt_logprobs), and the student minimises ``D`` per token over the
    teacher's top-k + tail buckets. A share ``1 − lmbda`` of the steps trains on cached rows of the logit cache
    instead (the teacher's own answers, off-policy), as GKD's λ."""

    # Where the teacher runs says nothing about what it is: a URL or a worker count does not retrain the student.
    __throughput_fields__: ClassVar[set[str]] = {"base_url", "concurrency", "batch_tokens", "timeout_s"}

    method: Literal[KDMethod.on_policy]
    divergence: Divergence = Field(
        Divergence.reverse_kl,
        description="per-token D(teacher ‖ student); reverse_kl "
        "(mode-seeking) is what on-policy distillation minimises",
    )
    temperature: Temperature = Field(1.0, description="the student's sampling temperature")
    max_new_tokens: int = Field(
        128, ge=1, description="tokens the student samples per prompt (capped by training.max_length)"
    )
    lmbda: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of steps on the student's own samples (GKD's λ); "
        "the rest train on cached rows of the logit cache (needs a `logit_cache:` section)",
    )
    k: int = Field(
        20, ge=1, le=1000, description="the teacher's top-k kept per scored position (the rest is one tail bucket)"
    )
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD's β (divergence jsd)")
    skew: float = Field(0.1, ge=0.0, lt=1.0, description="λ of skew_kl / skew_reverse_kl")
    teacher_backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf: the teacher in a scoring process of its "
        "own; vllm: a vLLM server's prompt_logprobs (started by the stage "
        "unless base_url names one)",
    )
    base_url: str | None = Field(None, description="a running vLLM server serving the teacher (teacher_backend vllm)")
    concurrency: int = Field(8, ge=1, description="requests in flight to the vLLM server")
    overlap: bool = Field(
        False,
        description="the teacher scores the next batch of samples while the student trains "
        "on this one (asynchronous, as in PipelineRL / Noukhovitch et al. 2024): a step waits on "
        "the teacher only for what training did not hide, and each batch was sampled by the "
        "student one on-policy batch ago, not by the current one",
    )
    timeout_s: float = Field(
        600.0,
        gt=0,
        description="seconds the teacher may stay silent (loading, one scored "
        "batch, one try of a request) before the stage fails naming the step: a stopped scoring "
        "process or a server that never replies would otherwise hold training forever",
    )
    # Small batches, not one: on the demo's 1M teacher a step's 64 samples as one 5,504-token batch took 247 ms on
    # one CPU thread, in batches of <= 1,024 tokens 128 ms (less padding, and activations that stay in cache).
    batch_tokens: int = Field(
        1024, ge=16, description="padded tokens per forward pass of the HF scoring process (teacher_backend hf)"
    )

    @field_serializer("base_url", when_used="json")  # what cache keys and manifests hold: no user:password@
    def _redacted(self, v: str | None) -> str | None:
        return redact_url(v)

    @model_validator(mode="after")
    def _server(self):
        if self.base_url is not None and self.teacher_backend != "vllm":
            raise ValueError(
                "base_url names a vLLM server; set teacher_backend: vllm, or remove base_url to score "
                "with the HF teacher in a process of its own"
            )
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url {self.base_url!r}: give the server's OpenAI base, e.g. http://127.0.0.1:8000/v1"
            )
        return self

    def summary(self) -> dict:
        return {
            "kd": self.method.value,
            "divergence": self.divergence.value,
            "lmbda": self.lmbda,
            "temperature": self.temperature,
            "k": self.k,
        } | ({"overlap": True} if self.overlap else {})


def _method_settings(value):
    """``value`` with ``method`` filled in (it was optional, meaning offline, before each method had its own model);
    a setting of another method is refused here with that method's name, which ``extra="forbid"`` cannot say."""
    if not isinstance(value, dict):
        return value
    value = {"method": KDMethod.offline.value, **value}
    try:
        method = KDMethod(value["method"])
    except ValueError:
        raise ValueError(f"method {value['method']!r}: use one of {[m.value for m in KDMethod]}") from None
    for key in value:
        if key not in MODELS[method].model_fields:
            owners = [m.value for m, model in MODELS.items() if key in model.model_fields]
            fix = f"remove it, or set method: {owners[0]}" if owners else "remove it or check its spelling"
            raise FieldError(f"not a setting of kd method {method.value}; {fix}", key)
    return value


MODELS = {
    KDMethod.offline: OfflineKD,
    KDMethod.online: OnlineKD,
    KDMethod.feature: FeatureKD,
    KDMethod.on_policy: OnPolicyKD,
}
KDSection = Annotated[
    OfflineKD | OnlineKD | FeatureKD | OnPolicyKD, Field(discriminator="method"), BeforeValidator(_method_settings)
]
KD_METHODS = frozenset(m.value for m in KDMethod)  # the union's tags: not YAML keys, left out of error paths


def check_settings(owner: str, section: type[Strict], values: dict, prefix: str = "") -> None:
    """The recipe section's checks on a trainer config's ``values`` (kdflow/training/: each method's config checks
    itself when built, as TRL's do), so that a setting's range is written once, here. A ValueError naming ``owner``'s
    bad fields (``prefix`` + the section's name for each) and what they must be."""
    try:
        section(**values)
    except ValidationError as e:
        found = [
            f"{owner}.{prefix}{'.'.join(map(str, err['loc']))} = {err['input']!r}: {err['msg']}"
            if err["loc"]
            else f"{owner}: {err['msg']}"
            for err in e.errors()
        ]
        raise ValueError("; ".join(found)) from None
