"""The ``run`` section: where a run's folder lives (a local folder, or an fsspec URL with a local staging folder)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from kdflow.config.fields import SAFE_NAME, SAFE_NAME_FIX, Strict, redact_url
from kdflow.store import remote


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
