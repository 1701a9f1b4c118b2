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

Results are stored as JSON (``STAGE_RESULTS``), never pickled: result storage on a shared mount (as
docs/howto/scale-out.md advises for several nodes) would let whoever can write there run code on every worker that loads
a pickle. And since Prefect picks the deserializer named *in the stored record*, a record is read here as plain JSON
first: anything but a JSON ``OutputRef`` with Prefect's own JSON serializer, in exactly the shape Prefect writes it, is
dropped and recomputed before Prefect's own lookup can unpickle it or import a module it names.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from prefect._internal.compatibility.blocks import call_explicitly_sync_block_method
from prefect.cache_policies import CachePolicy
from prefect.serializers import JSONSerializer

from kdflow.store.outputs import OutputRef
from kdflow.store.stage import Stage

# Every stage task: its small OutputRef result kept across runs, as JSON (see above).
STAGE_RESULTS = {"persist_result": True, "result_serializer": "json"}
OUTPUT_REF = f"{OutputRef.__module__}.{OutputRef.__name__}"
# The serializer a stage's record must name, exactly as Prefect writes it: its jsonlib and object_decoder are
# modules Prefect imports before it reads a byte of the result, so a record naming others is not read.
JSON_SERIALIZER = JSONSerializer().model_dump(mode="json")


class StageCache(CachePolicy):
    """Prefect's key for a stage task: ``Stage.key`` of the task's arguments, the very key its body builds under."""

    def __init__(self, stage: Stage):
        super().__init__()
        self.stage = stage

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        key = self.stage.key(**inputs)
        store = task_ctx.result_store
        if store is None or store.result_storage is None:
            return key
        found, ref = _stored_ref(store, key)
        if not found:
            return key
        if ref is not None and ref.is_complete() and _inside(ref.path, inputs.get("run_dir")):
            return key
        if _forget(store, key):
            return key
        # A result storage we cannot delete from: recompute under a key Prefect has never seen.
        return f"{key}-recompute-{uuid.uuid4().hex}"


def read_path(storage, path: str) -> bytes:
    """The bytes a result-storage block holds at ``path``, read synchronously. The one use of a private Prefect
    import: a storage block's ``read_path`` is async-compatible, and this helper is how Prefect's own result store
    calls it from sync code (tests/tasks/test_prefect_glue.py checks it against the pinned Prefect version)."""
    return call_explicitly_sync_block_method(storage, "read_path", (path,), {})


def _stored_ref(store, key: str) -> tuple[bool, OutputRef | None]:
    """(a record exists, the OutputRef it holds): read as plain JSON, never through a serializer the record
    names. A record that is not a JSON OutputRef (a pickle, another object, damaged) gives (True, None)."""
    try:
        if store.metadata_storage is not None:
            metadata = json.loads(read_path(store.metadata_storage, key))
            record = {"metadata": metadata, "result": read_path(store.result_storage, metadata["storage_key"])}
        else:
            record = json.loads(read_path(store.result_storage, key))
    except (OSError, ValueError):  # ValueError: not there (some storages), or not JSON
        return _exists(store, key), None
    try:
        if record["metadata"]["serializer"] != JSON_SERIALIZER:
            return True, None
        value = record["result"]
        return True, _plain_ref(json.loads(value if isinstance(value, (str, bytes)) else json.dumps(value)))
    except (KeyError, TypeError, AttributeError, ValueError):
        return True, None


def _plain_ref(value) -> OutputRef | None:
    """The OutputRef of a decoded result that has exactly the shape Prefect's JSON serializer gives one —
    ``{"__class__": OutputRef, "data": {field: string, number or null}}`` — else None. Checking only the outer
    ``__class__`` was not enough: Prefect's decoder imports the module any nested ``__class__`` names (an extra key
    ``{"__class__": "some.module.X", ...}`` in ``data``, which OutputRef's validation ignores) while it reads."""
    if not isinstance(value, dict) or value.keys() != {"__class__", "data"} or value["__class__"] != OUTPUT_REF:
        return None
    data = value["data"]
    if not isinstance(data, dict) or not data.keys() <= OutputRef.model_fields.keys():
        return None
    if any(v is not None and type(v) not in (str, int) for v in data.values()):
        return None
    return OutputRef.model_validate(data)


def _exists(store, key: str) -> bool:
    """Whether a record file is there, without reading it (local result storage); otherwise assume not."""
    basepath = getattr(store.result_storage, "basepath", None)
    return basepath is not None and (Path(basepath).expanduser() / key).exists()


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
