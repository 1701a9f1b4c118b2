"""The ``run`` section: where a run's folder lives (a local folder, or an fsspec URL with a local staging folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator

from kdflow.config.fields import SAFE_NAME, SAFE_NAME_FIX, Strict, redact_url, resolve
from kdflow.config.loading import FieldError
from kdflow.store import remote


def refuse_boolean_seeds(seeds):
    """``seeds`` as given, before pydantic reads them: a boolean among them fails naming its entry. pydantic reads
    ``true`` as the int 1, so ``seeds: [true, 0]`` trained seeds 1 and 0 without a word."""
    if isinstance(seeds, list):
        for i, seed in enumerate(seeds):
            if isinstance(seed, bool):
                raise FieldError(
                    f"{str(seed).lower()} is a boolean, not a seed (YAML reads an unquoted true/false/yes/no/on/off "
                    "as one): write the seed as a whole number, e.g. 0",
                    i,
                )
    return seeds


def check_seeds(seeds: list[int]) -> list[int]:
    """Seeds a run can train with: each once (a repeated one would name two runs of a student alike) and within what
    numpy and torch seed (0 to 2**32 - 1); a boolean is no seed (``True == 1`` in Python)."""
    refuse_boolean_seeds(seeds)
    if bad := [s for s in seeds if not 0 <= s < 2**32]:
        raise ValueError(f"seed {bad[0]} is outside 0 to {2**32 - 1}, the seeds numpy and torch take")
    if repeated := sorted({s for s in seeds if seeds.count(s) > 1}):
        raise ValueError(f"seed {repeated[0]} is given twice; list each seed once")
    return seeds


# Seeds as every section takes them (run.seeds, a sweep's seeds): no booleans, each once, each one numpy and torch take.
Seeds = Annotated[list[int], BeforeValidator(refuse_boolean_seeds), AfterValidator(check_seeds)]


class RunSection(Strict):
    name: str = Field(description="run folder name under `root`")
    # Defaults are validated too: a recipe outside the project that names no root writes beside itself.
    root: str = Field(
        "runs",
        validate_default=True,
        description="where run folders live: a local folder "
        "(relative: to the project for a recipe inside it, to the recipe's folder for one outside), or "
        "an fsspec URL (s3://bucket/runs, gs://…, file:///mnt/runs): stages then compute in `staging` "
        "and upload each finished output there (kdflow/store/remote.py)",
    )
    staging: str = Field(
        "runs/.staging",
        validate_default=True,
        description="with a URL `root`: the local folder "
        "stages compute in (models and parquet files need local paths); outputs already at the URL "
        "are downloaded here",
    )
    seeds: Seeds | None = Field(
        None,
        min_length=1,
        description="train and evaluate every student once per "
        "seed (named `<name>@<seed>`); the report gives mean and spread",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not SAFE_NAME.fullmatch(v):
            raise ValueError(f"{SAFE_NAME_FIX} (it becomes a folder name)")
        return v

    @field_validator("staging")
    @classmethod
    def _staging(cls, v: str, info: ValidationInfo) -> str:
        resolved = resolve(v, info, reads=False)
        _folder_or_nothing(Path(resolved).expanduser(), "run.staging")
        return resolved

    @field_validator("root")
    @classmethod
    def _reachable(cls, v: str, info: ValidationInfo) -> str:
        if not remote.is_url(v):
            resolved = resolve(v, info, reads=False)  # fields.PATH_RULE: beside a recipe outside the project
            _folder_or_nothing(Path(resolved).expanduser(), "run.root")
            return resolved
        if redact_url(v) != v:  # bound into the staging folder (.remote.json) and shown in every message
            raise ValueError(
                f"{redact_url(v)}: take the credentials out of the URL and give them to the file "
                "system the usual way (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or fsspec's "
                "config): the URL is written into the run folder"
            )
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


def _folder_or_nothing(path: Path, field: str) -> None:
    """``path``, or the nearest part of it that exists, must be a folder: a file there failed only when the data stage
    first wrote (a bare NotADirectoryError)."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise ValueError(
                    f"{part} is a file, not a folder: point {field} at a folder (it is created if missing)"
                )
            return
