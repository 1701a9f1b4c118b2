"""Recipes: one YAML per experiment, parsed into typed sections.

A bad recipe fails before any work with ``RecipeError``, naming the file, the field (and its line) and
the fix. Training knobs pass straight through to TRL's ``SFTConfig`` so that TRL validates them itself.
Fields listed in a section's ``__throughput_fields__`` (batch sizes for generation and evaluation) change
how fast a stage runs, not what it produces, so they are left out of cache keys.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    computed_field,
    field_serializer,
    field_validator,
    model_validator,
)

from kdflow.store import remote
from kdflow.logit_cache.format import ValueEncoding
from kdflow.training.losses import Divergence

ROOT = Path(__file__).resolve().parents[2]  # the project folder (kdflow/config/recipe.py)


class RecipeError(ValueError):
    pass


class FieldError(ValueError):
    """A validator's error about one entry inside its field (a split name, a training key): ``loc`` is the path
    from the field down to it, so that the message names that entry and its own line."""

    def __init__(self, message: str, *loc: str | int):
        super().__init__(message)
        self.loc = loc


class Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


# Names that become a file or folder name (run, split and student names): one path component, never '.' or
# '..' (a leading dot is refused), never a separator, so that nothing a recipe names is written outside its run
# folder.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SAFE_NAME_FIX = "use letters, digits, '.', '_' or '-' only, starting with a letter or digit"


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r}: {SAFE_NAME_FIX} (it becomes a file or folder name)")
    return name


SafeName = Annotated[str, AfterValidator(check_name)]


def _student_name(name: str) -> str:
    # run.seeds trains `<name>@<seed>` (Recipe.student_runs), and a launched student's section is read back
    # under that name (tasks/students.py StudentJob), so the seed suffix is part of the safe set here.
    base, at, seed = name.partition("@")
    check_name(base, "student name")
    if at and not re.fullmatch(r"-?\d+", seed):
        raise ValueError(f"student name {name!r}: '@' is followed by the seed only; {SAFE_NAME_FIX}")
    return name


StudentName = Annotated[str, AfterValidator(_student_name)]


def redact_url(url: str | None) -> str | None:
    """``url`` with any ``user:password@`` replaced by ``***@``: what manifests, cache keys and messages show."""
    if not url or "@" not in url:
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _confined(path: str, info: ValidationInfo | None, what: str = "template") -> str:
    """A file a recipe names, read into prompts, cache keys and manifests: it must lie in the project folder
    (paths are relative to it) or the recipe's own folder, so that a recipe cannot read /etc/passwd or ~/.ssh."""
    file = (ROOT / path).resolve()
    folders = [ROOT]
    if info is not None and info.context and info.context.get("recipe_dir"):
        folders.append(Path(info.context["recipe_dir"]).resolve())
    if not any(file.is_relative_to(f) for f in folders):
        raise ValueError(f"{what} {path!r} is outside the project folder ({ROOT})"
                         + (f" and the recipe's folder ({folders[1]})" if len(folders) > 1 else "")
                         + ": copy it under prompts/ and point at it there")
    return path


class RunSection(Strict):
    name: str = Field(description="run folder name under `root`")
    root: str = Field("runs", description="where run folders live: a local folder, or an fsspec URL (s3://bucket/"
                      "runs, gs://…, file:///mnt/runs): stages then compute in `staging` and upload each finished "
                      "output there (kdflow/store/remote.py)")
    staging: str = Field("runs/.staging", description="with a URL `root`: the local folder stages compute in (models "
                         "and parquet files need local paths); outputs already at the URL are downloaded here")
    seeds: list[int] | None = Field(None, min_length=1, description="train and evaluate every student once per "
                                    "seed (named `<name>@<seed>`); the report gives mean and spread")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not SAFE_NAME.fullmatch(v):
            raise ValueError(f"{SAFE_NAME_FIX} (it becomes a folder name)")
        return v

    @field_validator("root")
    @classmethod
    def _reachable(cls, v: str) -> str:
        if remote.is_url(v):
            if redact_url(v) != v:  # bound into the staging folder (.remote.json) and shown in every message
                raise ValueError(f"{redact_url(v)}: take the credentials out of the URL and give them to the file "
                                 "system the usual way (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or fsspec's "
                                 "config): the URL is written into the run folder")
            remote.check_url(v)
        return v

    @property
    def url(self) -> str | None:
        """The run folder's URL when `root` is one; None for a local run folder."""
        return f"{self.root.rstrip('/')}/{self.name}" if remote.is_url(self.root) else None

    def local_dir(self, base: Path) -> Path:
        """The folder stages write to: `root/name`, or with a URL root `staging/name`, bound to that URL."""
        if self.url is None:
            root = Path(self.root)
            return (root if root.is_absolute() else base / root) / self.name
        staging = Path(self.staging).expanduser()
        return remote.bind((staging if staging.is_absolute() else base / staging) / self.name, self.url)


class Difficulty(Strict):
    min_steps: int = Field(2, ge=1)
    max_steps: int = Field(4, ge=1)
    max_operand: int = Field(99, ge=2)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must be <= max_steps ({self.max_steps})")
        return self


class DataSource(str, enum.Enum):
    arithmetic = "arithmetic"  # the built-in demo generator (data/arithmetic.py)
    gsm8k = "gsm8k"  # GSM8K JSONL files (question, answer with '#### N')


class DataSection(Strict):
    source: DataSource
    seed: int = 0
    difficulty: Difficulty = Difficulty()
    # teacher: the teacher's own training data; train: the student's gold set (question + rationale);
    # prompts: extra questions with only a final answer, for the teacher to write rationales for.
    splits: dict[str, int] = Field(description="rows per split")
    path: str | None = Field(None, description="folder of <split>.jsonl files (gsm8k)")

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: dict[str, int]) -> dict[str, int]:
        for name in v:  # each becomes <name>.parquet in the data stage's output, and <name>.jsonl is read
            if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
                raise FieldError(f"split name {name!r}: {SAFE_NAME_FIX} (it becomes a file name: {name}.parquet)", name)
        missing = {"train", "test"} - set(v)
        if missing:
            raise ValueError(f"add the split(s) {sorted(missing)}: students train on 'train', evaluation uses 'test'")
        bad = {k: n for k, n in v.items() if not isinstance(n, int) or n < 1}
        if bad:
            raise ValueError(f"split sizes must be positive integers, got {bad}")
        return v

    @model_validator(mode="after")
    def _path_for_files(self):
        if self.source is DataSource.gsm8k and not self.path:
            raise ValueError("source 'gsm8k' reads local files: set data.path to the folder holding train.jsonl/test.jsonl")
        return self


class PromptsSection(Strict):
    cot: str = Field("prompts/cot.jinja", description="chain-of-thought template, relative to the repo")

    @field_validator("cot")
    @classmethod
    def _exists(cls, v: str, info: ValidationInfo) -> str:
        return check_template(v, info)

    def cot_text(self) -> str:
        return (ROOT / self.cot).read_text()


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
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else (annotation,)
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


def check_training_values(training: dict[str, Any], config_class) -> None:
    """Types and ranges of the numeric knobs, which the config dataclasses take without checking: "abc" as a
    learning rate fails only when the optimizer starts; YAML reads 3e-4 (no dot) as text."""
    for key, fix in SECRET_TRAINING_KEYS.items():
        if key in training:
            raise FieldError(f"remove it: a secret in a recipe reaches cache keys, manifests and logs; {fix}", key)
    fields = {f.name: f.type for f in dataclasses.fields(config_class)}
    for key, value in training.items():
        typed = _scalar_types(fields.get(key))
        if typed is not None and not (value is None and typed[1]) and not _value_ok(value, typed[0]):
            want = " or ".join(sorted(t.__name__ for t in typed[0]))
            hint = ""
            if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
                hint = f" (YAML reads {value} as text: write it with a dot, e.g. {float(value):.1e})"
            raise FieldError(f"{value!r} is not a {want}{hint}", key)
        if key in TRAINING_RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            ok, rule = TRAINING_RANGES[key]
            if not ok(value):
                raise FieldError(f"{value!r}: {rule}", key)


def _check_sft_config(training: dict[str, Any]) -> dict[str, Any]:
    """Let TRL validate the knobs: build the SFTConfig now, before any work (hardware settings aside,
    so that a GPU recipe validates on a CPU machine too)."""
    from trl import SFTConfig

    from kdflow.training.sft import sft_config

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


class TeacherSection(Strict):
    model: str | None = Field(None, description="an existing model folder: skips teacher training")
    architecture: Architecture | None = None
    vocab_size: int = Field(64, ge=16, description="BPE size of the locally trained shared tokenizer")
    seed: int = 0
    training: dict[str, Any] = Field(default_factory=dict, description="trl.SFTConfig keyword arguments")

    @field_validator("training")
    @classmethod
    def _training(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_sft_config(v)

    @model_validator(mode="after")
    def _train_or_load(self):
        if self.model is None and self.architecture is None:
            raise ValueError("set teacher.model (an existing model folder) or teacher.architecture (to train one)")
        if self.model is not None and not Path(self.model).exists() and "/" not in self.model:
            raise ValueError(f"teacher.model {self.model!r} is neither a folder nor a hub id")
        return self


class Backend(str, enum.Enum):
    hf = "hf"  # transformers, batched, in-process (CPUs)
    vllm = "vllm"  # a local vLLM OpenAI-compatible server the stage starts and stops itself
    openai = "openai"  # any OpenAI-compatible API: OpenAI, a vLLM or SGLang server, ...


class Endpoint(str, enum.Enum):
    chat = "chat"  # /v1/chat/completions: the model's chat template applies
    completions = "completions"  # /v1/completions: the rendered prompt is sent as raw text


def _template_text(path: str | None) -> str | None:
    return None if path is None else (ROOT / path).read_text()


def check_template(path: str | None, info: ValidationInfo | None = None) -> str | None:
    if path is not None and not (ROOT / _confined(path, info)).is_file():
        raise ValueError(f"no template at {ROOT / path}: point it at a file under prompts/")
    return path


class ApiSection(Strict):
    """How the stage talks to an OpenAI-compatible endpoint (backends `openai` and `vllm`). The API key is
    read at run time from the environment variable or Prefect Secret block named here, never from the
    recipe, so it appears in no cache key, manifest or log."""

    base_url: str | None = Field(None, description="e.g. https://api.openai.com/v1 (openai backend; vllm starts its own)")
    model: str | None = Field(None, description="model name the endpoint serves; default: the teacher's model")
    endpoint: Endpoint = Endpoint.chat
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    api_key_secret_block: str | None = Field(None, description="or: a Prefect Secret block holding it")
    token_ids: bool = Field(False, description="ask for exact token ids with logprobs (vLLM/SGLang servers only)")
    concurrency: int = Field(32, ge=1, description="requests in flight at once")
    timeout_s: float = Field(120.0, gt=0, description="per request")
    max_retries: int = Field(6, ge=0, description="on 429, 5xx, timeouts and dropped connections")
    max_failure_fraction: float = Field(0.01, ge=0.0, le=1.0,
                                        description="the stage fails when more requests than this fail for good")

    @field_serializer("base_url", when_used="json")  # what cache keys and manifests hold: no user:password@
    def _no_password(self, v: str | None) -> str | None:
        return redact_url(v)


PYTHON_NAME = re.compile(r"python(\d+(\.\d+)*)?")


class VllmServerSection(Strict):
    """The local vLLM server of the `vllm` backend: started for the stage, stopped after it."""

    python: str = Field(".venv-vllm/bin/python", description="interpreter with vllm installed (relative to the repo)")
    extra_args: list[str] = Field(default_factory=list, description="more api_server flags, e.g. [--dtype, bfloat16]")
    port: int | None = Field(None, ge=1, le=65535, description="default: a free port")
    startup_timeout_s: float = Field(600.0, gt=0)
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the served model is split across (vLLM's "
                                      "--tensor-parallel-size): a teacher too big for one GPU")

    @field_validator("python")
    @classmethod
    def _a_python(cls, v: str) -> str:
        # The stage runs this file: it must at least be named like a Python (kdflow/teacher/vllm_server.py also asks it
        # for its version before starting the server).
        if not PYTHON_NAME.fullmatch(Path(v).name):
            raise ValueError(f"{v!r} is not a Python interpreter: point it at the python of the virtualenv that has "
                             "vllm (e.g. .venv-vllm/bin/python, made by `make vllm`)")
        return v

    @model_validator(mode="after")
    def _one_tp_setting(self):
        if any(a.startswith("--tensor-parallel-size") or a == "-tp" for a in self.extra_args):
            raise ValueError("set tensor_parallel_size, not --tensor-parallel-size in extra_args")
        return self

    def server_args(self) -> list[str]:
        """The api_server flags: ``extra_args`` plus the tensor-parallel size."""
        tp = ["--tensor-parallel-size", str(self.tensor_parallel_size)] if self.tensor_parallel_size > 1 else []
        return [*self.extra_args, *tp]


class IclSection(Strict):
    """Few-shot in-context distillation: the teacher sees `k` solved demonstrations drawn from `pool_split`
    (its gold rationales); the stored training example is the zero-shot prompt with the teacher's answer."""

    k: int = Field(3, ge=1)
    pool_split: SafeName = Field("train", description="split whose questions and gold rationales are the demonstrations")
    template: str = "prompts/few_shot.jinja"
    seed: int = 0

    @field_validator("template")
    @classmethod
    def _exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        return check_template(v, info)

    @computed_field  # in model_dump, hence in the cache key: editing the template reruns the stage
    @property
    def template_text(self) -> str:
        return _template_text(self.template)


class GenerationSection(Strict):
    # Throughput and plumbing, not content: left out of the cache key (a nested dict: pydantic's exclude).
    __throughput_fields__: ClassVar[dict] = {
        "batch_size": True,
        "api": {"api_key_env", "api_key_secret_block", "concurrency", "timeout_s", "max_retries", "max_failure_fraction"},
        "vllm": {"python", "port", "startup_timeout_s", "tensor_parallel_size"},
    }
    backend: Backend = Backend.hf
    splits: list[SafeName] = Field(description="splits whose questions the teacher answers")
    template: str | None = Field(None, description="prompt template (e.g. prompts/instruct.jinja); default: prompts.cot")
    system_prompt: str | None = None
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="answers sampled per prompt (column `sample`: 0..n-1)")
    seed: int | None = Field(None, description="sampling seed (backends that take one)")
    logprobs: int | None = Field(None, ge=0, description="keep the top-k logprobs of each generated token")
    batch_size: int = Field(256, ge=1)
    api: ApiSection = ApiSection()
    vllm: VllmServerSection = VllmServerSection()
    icl: IclSection | None = None

    @field_validator("template")
    @classmethod
    def _exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        return check_template(v, info)

    @computed_field  # in model_dump, hence in the cache key
    @property
    def template_text(self) -> str | None:
        return _template_text(self.template)

    @model_validator(mode="after")
    def _consistent(self):
        if self.n > 1 and self.temperature == 0.0:
            raise ValueError(f"n = {self.n} samples at temperature 0 are all the same answer; set temperature > 0")
        if self.backend is Backend.openai and not self.api.base_url:
            raise ValueError("backend 'openai' needs api.base_url (e.g. https://api.openai.com/v1)")
        if self.backend is Backend.hf:
            unsupported = [f for f in ("system_prompt", "logprobs") if getattr(self, f) is not None]
            unsupported += ["top_p"] if self.top_p != 1.0 else []
            if unsupported:
                raise ValueError(f"backend 'hf' does not support {unsupported}: remove them or use backend 'vllm' or 'openai'")
        if self.logprobs is not None and self.logprobs > 20 and "api.openai.com" in (self.api.base_url or ""):
            raise ValueError(f"logprobs = {self.logprobs}: OpenAI's API returns at most 20 top logprobs; use <= 20")
        return self


class LengthFilter(Strict):
    min_tokens: int = Field(1, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    tokenizer: str | None = Field(None, description="the student's tokenizer (folder or hub id); unset: the "
                                  "answers' completion_tokens (the teacher's tokenizer, which the demo's students share)")

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be >= min_tokens ({self.min_tokens})")
        return self


REFUSALS = [r"\bI(?: a|')m (?:sorry|unable)\b", r"\bI can(?:no|')t (?:help|assist|answer|provide)\b",
            r"\bas an AI\b", r"\bI (?:won't|will not) (?:help|answer)\b"]


def _regex(v: str) -> str:
    try:
        re.compile(v)
    except re.error as e:
        raise ValueError(f"not a valid regular expression ({e}): {v!r}") from None
    return v


class PatternFilter(Strict):
    refusal: list[str] = Field(default_factory=lambda: list(REFUSALS), description="regexes (case-insensitive)")
    required: str | None = Field(None, description="a regex every kept answer must match, e.g. '#### '")

    @field_validator("refusal")
    @classmethod
    def _refusals(cls, v: list[str]) -> list[str]:
        return [_regex(p) for p in v]

    @field_validator("required")
    @classmethod
    def _required(cls, v: str | None) -> str | None:
        return v if v is None else _regex(v)


class DedupOn(str, enum.Enum):
    text = "text"  # the answer alone
    question = "question"  # the prompt alone (one answer per distinct question)
    question_and_text = "question_and_text"  # the pair: n different samples of one question all stay


class DedupFilter(Strict):
    exact: bool = True
    near: bool = True
    by: DedupOn = Field(DedupOn.question_and_text, description="what two rows must share to be copies")
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="MinHash Jaccard of word n-grams that counts as near")
    ngram: int = Field(3, ge=1)
    num_perm: int = Field(128, ge=16)


class SelectPolicy(str, enum.Enum):
    all = "all"  # every correct (or majority) sample
    shortest = "shortest"  # the shortest one
    best_k = "best_k"  # the k shortest, distinct texts


class SelfConsistency(Strict):
    """n samples per prompt: keep the correct ones (or, without gold, those with the majority answer)."""

    policy: SelectPolicy = SelectPolicy.all
    k: int = Field(1, ge=1, description="samples kept per prompt with policy best_k")


class JudgeFilter(Strict):
    template: str = Field("prompts/judge_filter.jinja", description="judge prompt; its reply ends 'Score: N'")
    threshold: float = Field(6.0, description="answers scored below this are dropped")
    max_new_tokens: int = Field(64, ge=1)

    @field_validator("template")
    @classmethod
    def _exists(cls, v: str, info: ValidationInfo) -> str:
        return check_template(v, info)

    def template_text(self) -> str:
        return (ROOT / self.template).read_text()


class FiltersSection(Strict):
    """Every filter is optional; a dropped row keeps its text and reason codes in dropped.parquet."""

    __throughput_fields__: ClassVar[set[str]] = {"judge_batch_size"}
    correctness: bool = Field(True, description="drop answers whose final answer differs from the gold one")
    truncated: bool = Field(True, description="drop answers cut at the token limit (finish_reason 'length')")
    empty: bool = Field(True, description="drop empty answers")
    length: LengthFilter | None = None
    patterns: PatternFilter | None = None
    self_consistency: SelfConsistency | None = None
    dedup: DedupFilter | None = None
    judge: JudgeFilter | None = None
    judge_batch_size: int = Field(64, ge=1)


class StudentData(str, enum.Enum):
    gold = "gold"  # SFT on the gold rationales of the train split: the baseline
    teacher = "teacher"  # SFT on the teacher's kept answers (sequence-level KD)


class KDMethod(str, enum.Enum):
    offline = "offline"  # white-box KD from the logit cache: no teacher in memory (kdflow/training/offline_kd.py)
    online = "online"  # TRL's GKD with the live teacher: on-policy fraction lmbda, JSD(beta), temperature
    feature = "feature"  # hidden-state KD with the live teacher, added to the language-modelling loss


class FeatureKD(Strict):
    layers: list[tuple[int, int]] | None = Field(None, description="(student layer, teacher layer) pairs of "
                                                 "hidden_states indices (0 = embeddings); default: spread evenly")
    kind: Literal["mse", "cosine"] = "mse"
    weight: float = Field(1.0, gt=0.0)


class KDSection(Strict):
    """White-box KD: ``alpha · CE(teacher's tokens) + (1 − alpha) · T² · D(teacher ‖ student)`` at temperature T."""

    method: KDMethod = KDMethod.offline
    divergence: Divergence = Divergence.forward_kl
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the cross-entropy term; 1 - alpha on KD")
    temperature: float = Field(1.0, gt=0.0, description="offline / feature: softmax(z / T) on both sides, the KD "
                               "term scaled by T²; online (TRL's GKD): the student's sampling temperature only")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD's β (divergence jsd, and method online)")
    skew: float = Field(0.1, ge=0.0, lt=1.0, description="λ of skew_kl / skew_reverse_kl")
    lmbda: float = Field(0.5, ge=0.0, le=1.0, description="online: the fraction of batches the student generates")
    max_new_tokens: int = Field(128, ge=1, description="online: tokens the student generates per on-policy sample")
    feature: FeatureKD | None = Field(None, description="method feature: the layer mapping and its loss")
    cross_tokenizer: Literal["gold"] | None = Field(None, description="gold: TRL's GOLD (cross-tokenizer ULD) "
                                                    "where the student's tokenizer differs from the teacher's")

    @model_validator(mode="after")
    def _method_settings(self):
        if self.method is KDMethod.online and self.divergence is not Divergence.jsd:
            raise ValueError(f"method online trains with TRL's GKD, whose loss is JSD(beta): set divergence: jsd "
                             f"(beta 0 = forward KL, 1 = reverse KL), not {self.divergence.value}")
        if self.method is KDMethod.feature and self.feature is None:
            raise ValueError("method feature needs a `feature:` section (layers, kind, weight); "
                             "`feature: {}` takes the defaults")
        if self.method is not KDMethod.feature and self.feature is not None:
            raise ValueError(f"`feature` is used by method feature only; remove it or set method: feature")
        if self.cross_tokenizer and self.method is not KDMethod.online:
            raise ValueError("cross_tokenizer gold is TRL's GOLD trainer, an online method with the live teacher (a "
                             "logit cache or hidden states hold the teacher's token positions): set method: online")
        return self


class LoraSection(Strict):
    """LoRA (Hu et al. 2021) through peft: the pretrained student's weights stay frozen and a low-rank update
    ``(alpha / r) · B·A`` is learned beside each targeted linear layer. On save the update is merged into the
    base weights, so the student's model folder is a plain causal LM; the adapter alone is kept in ``adapter/``."""

    r: int = Field(16, ge=1, description="rank of the update")
    alpha: float = Field(32.0, gt=0.0, description="the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="'all-linear': every linear layer but the LM head (peft's shorthand); or module "
        "names, e.g. [q_proj, v_proj] (Llama: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)")

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list adapts nothing: name modules (e.g. [q_proj, v_proj]) or use 'all-linear'")
            bad = [n for n in v if not re.fullmatch(r"[A-Za-z_][\w.]*", n)]
            if bad:
                raise ValueError(f"{bad} are not module names; use names such as q_proj, v_proj, or 'all-linear'")
        return v


class LaunchSection(Strict):
    """Train the student in processes of its own, started by ``accelerate launch`` (e.g. DDP over a node's GPUs),
    instead of inside the stage's process. The number of processes multiplies the global batch, so it and the
    config's text are part of the student's key."""

    accelerate_config: str = Field(description="an accelerate config file, relative to the repo (e.g. "
                                   "accelerate/multi_gpu.yaml) or absolute")
    num_processes: int | None = Field(None, ge=1, description="overrides the config's num_processes (e.g. the "
                                      "node's GPU count)")

    @field_validator("accelerate_config")
    @classmethod
    def _exists(cls, v: str) -> str:
        if not (ROOT / v).is_file():  # an absolute path stays absolute under ROOT / v
            raise ValueError(f"no accelerate config at {ROOT / v}: use accelerate/multi_gpu.yaml, "
                             "accelerate/cpu_2proc.yaml, or a file written by `accelerate config`")
        return v

    @model_validator(mode="after")
    def _process_count(self):
        config = yaml.safe_load(self.config_text) or {}
        if self.num_processes is None and config.get("num_processes", -1) == -1:
            raise ValueError(f"{self.accelerate_config} leaves the number of processes to you: set "
                             "launch.num_processes (e.g. the node's GPU count)")
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
    data_fraction: float = Field(1.0, gt=0.0, le=1.0, description="train on this share of the student's rows: a "
                                 "subset fixed by the seed, the same for every method (transfer-set sweeps)")
    model: str | None = Field(None, description="a pretrained model folder or hub id to fine-tune")
    architecture: Architecture | None = Field(None, description="or: a fresh Llama of this size, teacher's tokenizer")
    seed: int = 0
    training: dict[str, Any] = Field(default_factory=dict, description="trl.SFTConfig keyword arguments")
    lora: LoraSection | None = Field(None, description="train LoRA adapters on the pretrained `model` (peft)")
    launch: LaunchSection | None = Field(None, description="train through `accelerate launch` (multi-GPU)")

    @field_validator("training")
    @classmethod
    def _training(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_sft_config(v)

    def summary(self) -> dict:
        """What the report says of how this student was trained."""
        out = {"data": self.data.value, "seed": self.seed}
        if self.data_fraction < 1.0:
            out["data_fraction"] = self.data_fraction
        if self.kd is not None:
            out |= {"kd": self.kd.method.value, "divergence": self.kd.divergence.value, "alpha": self.kd.alpha,
                    "temperature": self.kd.temperature}
        if self.lora is not None:
            out["lora_r"] = self.lora.r
        return out

    @model_validator(mode="after")
    def _one_init(self):
        if (self.model is None) == (self.architecture is None):
            raise ValueError("set exactly one of model (fine-tune a pretrained student) or architecture (a fresh one)")
        if self.lora is not None:
            self._check_lora()
        return self

    def _check_lora(self) -> None:
        if self.architecture is not None:
            raise ValueError("lora: adapters train beside frozen pretrained weights, and a fresh `architecture:` "
                             "student has none worth freezing: set `model:` to a pretrained model folder (or hub "
                             "id) instead of `architecture:`, or remove `lora:` to train every weight")
        kd = self.kd
        if kd is not None and kd.method is KDMethod.feature:
            raise ValueError("lora with kd method feature: peft would freeze the learned feature projections "
                             "with the base weights; remove `lora:`, or use kd method offline or online")
        if kd is not None and kd.cross_tokenizer is not None:
            raise ValueError("lora with kd.cross_tokenizer gold is not supported yet; remove `lora:` to train "
                             "the whole student with GOLD")


class EvaluationSection(Strict):
    class Deployment(Strict):
        """How cost is measured: every model back to back, in one stage run, on the machine running it.
        These settings change the figures measured, so they are part of that stage's key."""

        latency_tokens: int = Field(32, ge=2, description="tokens each model generates per timed run")
        throughput_batch: int = Field(64, ge=1, description="prompts per batch for throughput and peak memory")
        repeats: int = Field(5, ge=1, description="timed runs per model (models alternate); the median is reported")

    class LmEval(Strict):
        """An lm-evaluation-harness run for real-scale models: needs a CUDA GPU and `pip install lm-eval`
        (not a default dependency); where either is missing the report says it was skipped and why."""

        enabled: bool = False
        tasks: list[str] = Field(default_factory=lambda: ["gsm8k"], min_length=1)
        num_fewshot: int | None = Field(None, ge=0)
        limit: int | None = Field(None, ge=1, description="questions per task; None for all (real figures)")

    class Judge(Strict):
        """An LLM judge comparing each student's greedy answers with the teacher's on the evaluation questions
        (for instruction data, where no answer checker exists). Each pair is judged twice, the student's answer
        first as A, then as B, so a judge that prefers a position scores the student ½, not 1 or 0.

        The judge: ``backend: openai``, a model an OpenAI-compatible API serves at ``base_url``; ``backend: vllm``,
        a local model folder (or hub id) served by the stage itself; ``backend: hf``, that folder run in-process.
        A local judge is keyed by its path, not its weights: point ``model`` at a new folder for a new judge."""

        # How fast or with which credentials, not what is judged: left out of the stage's key.
        __throughput_fields__: ClassVar[dict] = {
            **{f: True for f in ("api_key_env", "api_key_secret_block", "concurrency", "timeout_s", "max_retries",
                                 "max_failure_fraction", "batch_size")},
            "vllm": {"python", "port", "startup_timeout_s", "tensor_parallel_size"},
        }
        backend: Backend = Backend.openai
        model: str = Field(description="openai: the served model name; vllm, hf: a local model folder or hub id")
        base_url: str | None = Field(None, description="the API's URL, e.g. https://api.openai.com/v1 (openai only)")
        template: str = Field("prompts/judge.jinja", description="judge prompt; its reply ends 'Verdict: A|B|tie'")
        max_questions: int | None = Field(None, ge=1, description="the first N questions of the split; None: all")
        max_new_tokens: int = Field(256, ge=1, description="room for the judge's reasoning and its verdict line")
        concurrency: int = Field(16, ge=1, description="requests in flight at once (openai, vllm)")
        batch_size: int = Field(16, ge=1, description="prompts per generate call (hf)")
        api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the API key")
        api_key_secret_block: str | None = Field(None, description="or: a Prefect Secret block holding it")
        timeout_s: float = Field(120.0, gt=0, description="per request")
        max_retries: int = Field(6, ge=0, description="on 429, 5xx, timeouts and dropped connections")
        max_failure_fraction: float = Field(0.05, ge=0.0, le=1.0,
                                            description="the stage fails when more requests than this fail for good")
        vllm: VllmServerSection = VllmServerSection()

        @field_validator("template")
        @classmethod
        def _exists(cls, v: str, info: ValidationInfo) -> str:
            return check_template(v, info)

        @computed_field  # in model_dump, hence in the cache key: editing the template re-judges
        @property
        def template_text(self) -> str:
            return _template_text(self.template)

        @field_serializer("base_url", when_used="json")  # what cache keys and manifests hold: no user:password@
        def _no_password(self, v: str | None) -> str | None:
            return redact_url(v)

        @model_validator(mode="after")
        def _judge_named(self):
            if self.backend is Backend.openai and not self.base_url:
                raise ValueError("backend 'openai' needs base_url (e.g. https://api.openai.com/v1); for a local "
                                 "model folder use backend 'vllm' or 'hf'")
            if self.backend is not Backend.openai and self.base_url:
                raise ValueError(f"base_url is for backend 'openai'; backend '{self.backend.value}' runs the judge "
                                 "itself: remove base_url, or set backend: openai to use a running server")
            if self.backend is not Backend.openai and not Path(self.model).exists() and "/" not in self.model:
                raise ValueError(f"model {self.model!r} is neither a local folder nor a hub id "
                                 f"(backend '{self.backend.value}' loads it itself)")
            return self

    # deployment, lm_eval and judge are handed to their own stages, which key on them; leaving them out of this
    # section's key keeps a new latency setting or judge from re-running every model's evaluation.
    __throughput_fields__: ClassVar[set[str]] = {"batch_size", "deployment", "lm_eval", "judge"}
    split: SafeName = "test"
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(256, ge=1)
    pass_at_k: int | None = Field(None, ge=1, description="also report pass@k from `samples` sampled answers")
    samples: int | None = Field(None, ge=1, description="sampled answers per question for pass@k (default: k)")
    temperature: float = Field(0.8, gt=0.0, description="sampling temperature for pass@k")
    deployment: Deployment = Deployment()
    lm_eval: LmEval = LmEval()
    judge: Judge | None = Field(None, description="an LLM judge's win rate of each student against the teacher")

    @model_validator(mode="after")
    def _samples_cover_k(self):
        if self.pass_at_k is not None and self.samples is not None and self.samples < self.pass_at_k:
            raise ValueError(f"samples ({self.samples}) must be >= pass_at_k ({self.pass_at_k}): "
                             "pass@k needs at least k sampled answers per question")
        return self

    @property
    def pass_samples(self) -> int | None:
        return None if self.pass_at_k is None else self.samples or self.pass_at_k


class CaptureSource(str, enum.Enum):
    hf = "hf"  # the teacher's own forward pass (transformers, batched): exact tail mass, any temperature
    vllm = "vllm"  # a vLLM server's prompt_logprobs (teacher-forced; started for the teacher if no base_url)
    api = "api"  # the top_logprobs an API returned while generating (gray-box KD; generation.logprobs, k <= 20)


class EnsembleMember(Strict):
    model: str = Field(description="a local model folder sharing the teacher's tokenizer")
    weight: float = Field(1.0, gt=0.0)


class LogitCacheSection(Strict):
    """The teacher's top-k distributions on the kept answers, captured once for KD from disk
    (kdflow/logit_cache/format.py). Sizes per answer token: see README "Logit cache"."""

    # How fast, or where from, not what: left out of the stage's key.
    __throughput_fields__: ClassVar[set[str]] = {"batch_tokens", "concurrency", "base_url"}
    source: CaptureSource = CaptureSource.hf
    k: int = Field(20, ge=1, description="token ids and log-probs kept per position")
    temperature: float = Field(1.0, gt=0.0, description="capture temperature: softmax(z / T)")
    value_encoding: ValueEncoding = Field(ValueEncoding.u8, description="u8 (1 byte, error <= 1/24 nat) or fp16")
    shard_rows: int = Field(1024, ge=1, description="rows per shard: the unit a crashed capture resumes from")
    teacher_weight: float = Field(1.0, gt=0.0, description="the teacher's weight when `ensemble` adds members")
    ensemble: list[EnsembleMember] = Field(default_factory=list, description="more teachers (source hf only)")
    batch_tokens: int = Field(16384, ge=16, description="padded tokens per forward pass (hf)")
    concurrency: int = Field(8, ge=1, description="requests in flight (vllm)")
    base_url: str | None = Field(None, description="a running vLLM server serving the teacher (vllm)")

    @field_serializer("base_url", when_used="json")  # what cache keys and manifests hold: no user:password@
    def _no_password(self, v: str | None) -> str | None:
        return redact_url(v)

    @model_validator(mode="after")
    def _source_limits(self):
        if self.source is not CaptureSource.hf and self.temperature != 1.0:
            raise ValueError(f"temperature {self.temperature} needs source 'hf': {self.source.value} gives only the "
                             "top-k at T = 1, and rescaling needs the whole distribution")
        if self.source is not CaptureSource.hf and self.ensemble:
            raise ValueError("ensemble members are captured with source 'hf'; set source: hf")
        if self.source is CaptureSource.api and self.k > 20:
            raise ValueError(f"k={self.k}: APIs return at most 20 top_logprobs; use k <= 20")
        return self


class Recipe(Strict):
    run: RunSection
    data: DataSection
    prompts: PromptsSection = PromptsSection()
    teacher: TeacherSection
    generation: GenerationSection
    filters: FiltersSection = FiltersSection()
    students: list[StudentSection] = Field(min_length=1)
    evaluation: EvaluationSection = EvaluationSection()
    logit_cache: LogitCacheSection | None = None

    @model_validator(mode="after")
    def _cross_checks(self):
        names = [s.name for s in self.students]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"students.name must be unique; rename {dup}")
        for split in [*self.generation.splits, self.evaluation.split]:
            if split not in self.data.splits:
                raise ValueError(f"split {split!r} is not in data.splits {sorted(self.data.splits)}: add it there")
        if self.evaluation.split in self.generation.splits:
            raise ValueError(f"generation.splits includes the evaluation split {self.evaluation.split!r}: "
                             "students would train on test questions; remove it")
        for s in self.students:
            if s.kd is None:
                continue
            if s.data is not StudentData.teacher:
                raise ValueError(f"student {s.name!r}: kd distils the teacher on its own answers; set data: teacher")
            if s.kd.method is KDMethod.offline and self.logit_cache is None:
                raise ValueError(f"student {s.name!r}: kd method offline trains from the logit cache; add a "
                                 "`logit_cache:` section (e.g. `logit_cache: {k: 20}`)")
        return self

    def with_seeds(self, seeds: list[int]) -> Recipe:
        """This recipe with ``run.seeds`` replaced (the run folder and every cached stage stay the same)."""
        return self.model_copy(update={"run": self.run.model_copy(update={"seeds": [int(s) for s in seeds]})})

    def student_runs(self) -> list[StudentSection]:
        """The students to train: as listed, or each once per ``run.seeds`` seed, named ``<name>@<seed>``."""
        if not self.run.seeds:
            return list(self.students)
        return [s.model_copy(update={"name": f"{s.name}@{seed}", "seed": seed})
                for s in self.students for seed in self.run.seeds]

    @property
    def run_dir(self) -> Path:
        return self.run.local_dir(ROOT)


def _line_of(node, loc: tuple) -> int | None:
    """The 1-based YAML line of the field at ``loc`` (or of its closest existing parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == part]
            if not match:
                return line
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return line
        line = node.start_mark.line + 1
    return line


def read_recipe_text(path: Path) -> str:
    """A recipe file's text; a byte that is not UTF-8 is a ``RecipeError`` naming the file, line and offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: byte 0x{data[e.start]:02x} at offset {e.start} is not UTF-8 ({e.reason}); "
                          "save the file as UTF-8") from None


def _duplicate_key(node, path: tuple = ()) -> tuple[str, int, int] | None:
    """(field, line, first line) of the first key that a mapping repeats: PyYAML silently keeps the last value."""
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: overriding merged keys is what it is for
                continue
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name in seen:
                return ".".join(map(str, (*path, name))), key.start_mark.line + 1, seen[name]
            seen[name] = key.start_mark.line + 1
            if found := _duplicate_key(value, (*path, name)):
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            if found := _duplicate_key(item, (*path, i)):
                return found
    return None


def load_yaml(text: str, source: str, what: str = "a recipe is a YAML mapping with sections run, data, teacher, ..."
              ) -> dict:
    """The YAML mapping of a recipe of any kind; invalid YAML, a repeated key or a non-mapping is a ``RecipeError``."""
    try:
        duplicate = _duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader))
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {e}") from None
    if duplicate:
        field, line, first = duplicate
        raise RecipeError(f"{source}:{line}: {field}: set twice (first at line {first}); YAML would silently keep "
                          "the last value: remove one of them")
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {what}")
    return raw


def parse_recipe(text: str, source: str = "<recipe>", folder: Path | None = None) -> Recipe:
    """``folder``: the recipe file's folder, where (besides the project folder) the templates it names may lie."""
    raw = load_yaml(text, source)
    try:
        return Recipe.model_validate(raw, context={"recipe_dir": folder})
    except ValidationError as e:
        raise RecipeError("invalid recipe\n  " + "\n  ".join(validation_problems(e, text, source))) from None


def validation_problems(error: ValidationError, text: str, source: str, skip: frozenset[str] = frozenset()) -> list[str]:
    """One ``file:line: field: fix`` line per pydantic error. ``skip``: location parts that are not YAML keys
    (e.g. the tags of a discriminated union), left out of the field name and the line lookup."""
    root = yaml.compose(text)
    problems = []
    for err in error.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in skip)))
        if isinstance(cause := (err.get("ctx") or {}).get("error"), FieldError):
            loc += cause.loc  # the entry inside the field: its own name and line
        field = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        elif err["type"] == "missing":
            msg = "required field is missing; add it"
        problems.append(f"{source}:{_line_of(root, loc)}: {field}: {msg}")
    return problems


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    return parse_recipe(read_recipe_text(path), source=str(path), folder=path.parent)
