"""Content-keyed Prefect caching for stages, with every cache hit verified before it is trusted.

Prefect's default cache policy includes the flow run id (nothing is reused across runs) and
``TASK_SOURCE`` hashes only the task's own body, so a stage's key is built here from what its output
depends on: the stage name, an explicit code version, and its inputs by content (recipe sections by
value, upstream outputs by their sha256, prompts by their text). ``run_dir`` says where the output goes,
not what it is, so it is left out.

A cached result is only an ``OutputRef``; before it is trusted, the folder it points to must still exist
inside this run's folder with the manifest it was made with. If not (deleted, half-deleted, another run's
folder), the stale record is removed and the stage runs again under the same key, so that the next run is
a plain cache hit again.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from kdflow.outputs import OutputRef, content_key

NOT_CONTENT = {"run_dir"}


def stage_key(stage: str, version: str, inputs: dict[str, Any]) -> str:
    return content_key(stage, version, {k: v for k, v in inputs.items() if k not in NOT_CONTENT})


class StageCache(CachePolicy):
    def __init__(self, stage: str, version: str):
        super().__init__()
        self.stage, self.version = stage, version

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        key = stage_key(self.stage, self.version, inputs)
        store = task_ctx.result_store
        if store is None or not store.exists(key):
            return key
        ref = store.read(key).result
        if isinstance(ref, OutputRef) and ref.is_complete() and _inside(ref.path, inputs.get("run_dir")):
            return key
        if _forget(store, key):
            return key
        # A result storage we cannot delete from: recompute under a key Prefect has never seen.
        return f"{key}-recompute-{uuid.uuid4().hex}"


def _forget(store, key: str) -> bool:
    """Delete a stale cache record; True when done (local result storage, where records are files)."""
    basepath = getattr(store.result_storage, "basepath", None)
    if basepath is None or store.metadata_storage is not None:
        return False
    (Path(basepath).expanduser() / key).unlink(missing_ok=True)
    return not store.exists(key)


def _inside(path: str, run_dir) -> bool:
    if run_dir is None:
        return True
    return Path(path).resolve().is_relative_to(Path(run_dir).resolve())
