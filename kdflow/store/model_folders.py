"""Where a model stage's weights live, and what a model costs (parameters)."""

from __future__ import annotations

import json
from pathlib import Path

from kdflow.store.outputs import OutputRef

SOURCE = "model.json"  # {"location": <folder relative to the stage output, absolute folder, or hub id>}


def model_location(ref: OutputRef) -> str:
    location = json.loads((Path(ref.path) / SOURCE).read_text())["location"]
    local = Path(ref.path) / location
    return str(local) if not Path(location).is_absolute() and local.exists() else location


def write_location(stage_dir: Path, location: str) -> None:
    (Path(stage_dir) / SOURCE).write_text(json.dumps({"location": location}))
