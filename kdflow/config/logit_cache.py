"""The ``logit_cache`` section: the teacher's top-k distributions captured once for offline KD, and how they are
stored (kdflow/logit_cache/format.py reads ``ValueEncoding`` from here, so that a recipe loads without torch); or, with
``import``, another tool's logit dataset read into the cache instead (the checks across sections:
kdflow/config/logit_import.py)."""

from __future__ import annotations

import enum
import json
import re
from pathlib import Path
from typing import ClassVar

from pydantic import ConfigDict, Field, field_serializer, field_validator, model_validator

from kdflow.config.fields import ROOT, RecipePath, Strict, redact_url
from kdflow.config.loading import FieldError
from kdflow.config.precision import Dtype, dtype_field


class ValueEncoding(str, enum.Enum):
    fp16 = "fp16"  # log-probs as float16: 2 bytes each
    u8 = "u8"  # log-probs on a 1/12-nat grid: 1 byte each


class CaptureSource(str, enum.Enum):
    hf = "hf"  # the teacher's own forward pass (transformers, batched): exact tail mass, any temperature
    vllm = "vllm"  # a vLLM server's prompt_logprobs (teacher-forced; started for the teacher if no base_url)
    api = "api"  # the top_logprobs an API returned while generating (gray-box KD; generation.logprobs, k <= 20)


# The columns a file of each format must have (any one set): what the readers in kdflow/logit_cache/ need, checked
# in the file's footer when a recipe loads. DistillKit writes its compressed pair, or raw ids and values.
FORMAT_COLUMNS = {
    "axolotl": (("input_ids", "target_token_ids", "target_logprobs", "target_mask"),),
    "distillkit": (
        ("input_ids", "bytepacked_indices", "compressed_logprobs"),
        ("input_ids", "token_ids", "top_values"),
    ),
}
DISTILLKIT_CONFIG = "compression_config.yaml"  # beside the data files, as DistillKit's capture writes it
EXPORT_METADATA = b"kdflow"  # the parquet metadata key of kdflow's exports: row ids, spans, the cache's fingerprint


class LogitFormat(str, enum.Enum):
    distillkit = "distillkit"  # DistillKit's compressed parquet (data_<i>.parquet + compression_config.yaml)
    axolotl = "axolotl"  # axolotl's KD columns (target_token_ids, target_logprobs, target_mask)


def data_files(source: str | Path) -> list[Path]:
    """A parquet file, or a folder's ``*.parquet`` in their numeric order (data_2 before data_10)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if source.exists() and not source.is_dir():  # a FIFO or a device: opening it would wait for a writer forever
        raise FileNotFoundError(f"{source}: not a regular file or a folder")
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such file or folder")
    numeric = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # noqa: E731
    files = sorted(source.glob("*.parquet"), key=numeric)
    if not files:
        raise FileNotFoundError(f"{source}: no .parquet files in it")
    if odd := [f for f in files if not f.is_file()]:
        raise FileNotFoundError(f"{odd[0]}: not a regular file (a FIFO, device or folder named .parquet); remove it")
    return files


def parquet_problem(file: Path, fmt: str) -> str | None:
    """What makes ``file`` unreadable as a logit dataset of format ``fmt``, seen from its footer alone (not a parquet
    file, no rows, not the format's columns); None when it may be read. The rows themselves (ids inside the
    vocabulary, finite log-probs, columns of equal length) are checked by the import, which reads them all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(file)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        return f"{file}: not a whole parquet file ({e}): truncated, damaged or another format; export it again"
    if meta.num_rows == 0:
        return f"{file}: holds no rows; export the logit dataset again, or remove the file from the folder"
    names = set(meta.schema.to_arrow_schema().names)
    sets = FORMAT_COLUMNS[fmt]
    if not any(names >= set(columns) for columns in sets):
        wanted = " or ".join(", ".join(columns) for columns in sets)
        return (
            f"{file}: not a {fmt} logit dataset: its columns are {', '.join(sorted(names))}, and {fmt} files have "
            f"{wanted}; set logit_cache.import.format to the format that wrote it"
        )
    return None


_RULE = "the project folder for a recipe inside it, else the recipe's folder"


def on_disk(path: str) -> Path:
    """Where a path of the recipe lies (relative: under the project folder, as ``fields.resolve`` leaves it)."""
    return ROOT / path  # an absolute path stays absolute


class LogitImport(Strict):
    """Train from another tool's logit dataset instead of capturing the teacher's logits: the file(s) are read once into
    a kdflow logit cache (a stage of its own, keyed by the files' sha256, these settings and the students' tokenizer),
    which offline-KD students train from exactly as from a captured one, on the sequences it holds."""

    path: RecipePath = Field(
        description="a parquet file, or a folder of them (`data_<i>.parquet`, read in numeric order): what "
        "`kdflow logit-cache-export`, DistillKit's capture or axolotl's KD preprocessing wrote. Keyed by the files' "
        "content, not their path: the same files moved elsewhere are not imported again"
    )
    format: LogitFormat = Field(
        description="distillkit (compressed parquet: input_ids, compressed_logprobs, bytepacked_indices) or axolotl "
        "(KD columns: target_token_ids, target_logprobs, target_mask)"
    )
    config: RecipePath | None = Field(
        None,
        description="distillkit only: its compression_config.yaml (how its columns are packed); default: the one "
        "beside the data files",
    )
    vocab_size: int | None = Field(
        None,
        ge=1,
        le=1_048_576,  # teacher.vocab_size's bound: four times the largest vocabulary of today's open models
        description="the teacher's logits per position (1 to 1,048,576), which must be the students' vocab_size; "
        "default: what a "
        "kdflow export recorded, else DistillKit's `d`, else the tokenizer's length (set it when the model's "
        "embedding is padded past its tokenizer)",
    )
    value_encoding: ValueEncoding | None = Field(
        None,
        description="how the cache stores log-probs: u8 (1 byte, error <= 1/24 nat) or fp16; default: what a kdflow "
        "export recorded, else u8",
    )
    teacher: str | None = Field(
        None,
        description="the name of the model that made the logits, recorded in the cache's manifest (a kdflow "
        "export records its own, and another name here is refused); default: the format and first file's name",
    )

    @field_validator("path")
    @classmethod
    def _files_there(cls, v: str) -> str:
        try:
            data_files(on_disk(v))
        except FileNotFoundError as e:
            raise ValueError(f"{e}: point it at the parquet file or the folder of them (relative paths: {_RULE})")
        return v

    @model_validator(mode="after")
    def _config(self):
        if self.format is LogitFormat.axolotl and self.config is not None:
            raise FieldError(
                "axolotl's columns are plain top-k ids and log-probs, with no compression config: remove it", "config"
            )
        if self.format is LogitFormat.distillkit and not self.config_file().is_file():
            where = "" if self.config else f" (none beside {on_disk(self.path)})"
            raise FieldError(
                f"no DistillKit compression config at {self.config_file()}{where}: it says how the columns are "
                f"packed; set logit_cache.import.config to the {DISTILLKIT_CONFIG} its capture wrote",
                "config",
            )
        for file in data_files(on_disk(self.path)):
            if problem := parquet_problem(file, self.format.value):
                raise FieldError(problem, "path")
        return self

    def files(self) -> list[Path]:
        return data_files(on_disk(self.path))

    def config_file(self) -> Path:
        """DistillKit's compression config: the one named, else the one beside the data files."""
        if self.config is not None:
            return on_disk(self.config)
        source = on_disk(self.path)
        return (source if source.is_dir() else source.parent) / DISTILLKIT_CONFIG

    def export_record(self) -> dict | None:
        """What a kdflow export recorded of the cache it was made from (tokenizer fingerprint, vocabulary, k), read
        from the first file's parquet metadata; None for a file another tool wrote. (A recipe-level check: a damaged
        file is an error at logit_cache.import.path.)"""
        import pyarrow as pa
        import pyarrow.parquet as pq

        file = self.files()[0]
        try:
            meta = pq.read_schema(file).metadata or {}
        except (pa.ArrowInvalid, OSError) as e:
            raise FieldError(
                f"{file}: not a whole parquet file ({e}): copy or export it again", "logit_cache", "import", "path"
            ) from None
        return json.loads(meta[EXPORT_METADATA])["cache"] if EXPORT_METADATA in meta else None


CAPTURE_ONLY_FIX = "it sets how the teacher's logits are captured, and an imported cache is not captured"


def check_capture_fields(section) -> None:
    """A ``logit_cache`` section with ``import``: refuse every setting of a capture (``shard_rows`` applies to both)."""
    for name in sorted(section.model_fields_set - {"import_", "shard_rows"}):
        if name == "value_encoding":
            raise FieldError(
                f"{CAPTURE_ONLY_FIX}: set logit_cache.import.value_encoding instead (the imported cache's storage)",
                name,
            )
        raise FieldError(f"{CAPTURE_ONLY_FIX}: remove logit_cache.{name}, or remove logit_cache.import", name)


class EnsembleMember(Strict):
    model: str = Field(description="a local model folder sharing the teacher's tokenizer")
    weight: float = Field(1.0, gt=0.0)


class LogitCacheSection(Strict):
    """The teacher's top-k distributions on the kept answers, captured once for KD from disk
    (kdflow/logit_cache/format.py). Sizes per answer token: docs/results/benchmarks.md. With ``import``, another
    tool's logit dataset instead: then only ``shard_rows`` may be set beside it."""

    # `import` is a Python keyword: the field is import_, written `import:` in a recipe.
    model_config = ConfigDict(**Strict.model_config, populate_by_name=True)
    # How fast, or where from, not what: left out of the stage's key.
    __throughput_fields__: ClassVar[set[str]] = {"batch_tokens", "concurrency", "base_url", "timeout_s"}
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
    timeout_s: float = Field(
        600.0,
        gt=0,
        description="seconds one try of a request may go unanswered (vllm): a "
        "server that accepts and never replies fails the capture instead of holding it forever",
    )
    dtype: Dtype | None = dtype_field(
        "the teacher's precision during capture (hf: loaded in it; vllm: served in it; log-probs in float32 either way)"
    )
    import_: LogitImport | None = Field(
        None,
        alias="import",
        description="read this logit dataset (DistillKit's or axolotl's, or a kdflow export) into the run's cache "
        "instead of capturing the teacher's: e.g. {path: data/logits/, format: axolotl}. Offline-KD students train "
        "on its own rows; the teacher is asked for no answers unless a student learns from them "
        "(docs/howto/logit-datasets.md)",
    )

    @field_serializer("base_url", when_used="json")  # what cache keys and manifests hold: no user:password@
    def _no_password(self, v: str | None) -> str | None:
        return redact_url(v)

    @property
    def imported(self) -> bool:
        return self.import_ is not None

    @model_validator(mode="after")
    def _source_limits(self):
        if self.imported:
            check_capture_fields(self)
            return self
        if self.source is not CaptureSource.hf and self.temperature != 1.0:
            raise ValueError(
                f"temperature {self.temperature} needs source 'hf': {self.source.value} gives only the "
                "top-k at T = 1, and rescaling needs the whole distribution"
            )
        if self.source is not CaptureSource.hf and self.ensemble:
            raise ValueError("ensemble members are captured with source 'hf'; set source: hf")
        if self.source is CaptureSource.api and self.dtype is not None:
            raise ValueError("dtype: with source 'api' the API's own model made the logprobs; remove dtype")
        if self.source is CaptureSource.vllm and self.base_url and self.dtype is not None:
            raise ValueError(
                "dtype: a running server (base_url) serves in the dtype it was started with; remove "
                "dtype, or remove base_url to let the stage start the server in that dtype"
            )
        if self.source is CaptureSource.api and self.k > 20:
            raise ValueError(f"k={self.k}: APIs return at most 20 top_logprobs; use k <= 20")
        return self
