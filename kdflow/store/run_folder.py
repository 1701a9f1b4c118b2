"""What a run folder already holds: its finished stage outputs, found from their manifests.

A stage flow rerun alone on an existing run ("retrain the students of run X with a new loss") takes its
inputs from here instead of recomputing them: the newest complete output of each upstream stage. Only
folders whose ``manifest.json`` is there count (no manifest, not finished); temporary and trash folders
(hidden names) are never looked at. A run folder on remote storage (kdflow/store/remote.py) counts the outputs there
too: those this machine lacks are downloaded first (a stage flow rerun alone on a fresh machine).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kdflow.store import remote
from kdflow.store.outputs import MANIFEST, OutputRef, sync


class MissingStage(LookupError):
    """The run folder has no finished output of a stage another stage needs."""


def outputs(run_dir: Path, stage: str) -> list[OutputRef]:
    """Every complete output of ``stage`` in the run folder, oldest first (by the manifest's time of writing)."""
    folder = Path(run_dir) / stage
    if (url := remote.bound_url(run_dir)) is not None:
        for name in remote.complete_outputs(f"{url}/{stage}"):
            sync(run_dir, stage, name)
    found = []
    for manifest in folder.glob(f"[!.]*/{MANIFEST}"):
        try:
            m = json.loads(manifest.read_text())
            ref = OutputRef(
                stage=stage, key=m["key"], path=str(manifest.parent.resolve()), sha256=m["sha256"], rows=m.get("rows")
            )
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            # Damaged (a manifest is replaced atomically, so never half-written by kdflow): not an output to build
            # on, and said, so that a stage that seems to have vanished can be found.
            logging.getLogger(__name__).warning(
                f"{manifest.parent}: damaged {MANIFEST} ({type(e).__name__}: {e}); "
                "not counted as a finished output: delete the folder to rebuild it"
            )
            continue
        # created_at has one-second resolution; the file's mtime breaks ties between outputs of one second.
        found.append((m.get("created_at", ""), manifest.stat().st_mtime_ns, ref))
    return [ref for *_, ref in sorted(found, key=lambda t: t[:2])]


def latest(run_dir: Path, stage: str, name: str | None = None) -> OutputRef:
    """The newest complete output of ``stage`` (of the student called ``name``, for the students stage)."""
    refs = [r for r in outputs(run_dir, stage) if name is None or r.manifest().get("name") == name]
    if not refs:
        what = f"{stage!r} output" + (f" named {name!r}" if name else "")
        raise MissingStage(
            f"no finished {what} in {run_dir}: run the stage that makes it first, or the whole "
            "flow (kdflow distill <recipe>)"
        )
    return refs[-1]


def read_split(data: OutputRef, split: str) -> list[dict]:
    """The rows of one split of the data stage's output."""
    import pandas as pd

    return pd.read_parquet(Path(data.path) / f"{split}.parquet").to_dict("records")
