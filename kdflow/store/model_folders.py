"""Where a model stage's weights live, what a model costs (parameters), and how a model folder a recipe names is
keyed: by its files, not its path.

A local folder named in a recipe (a pretrained student's ``model``, a local judge) can be replaced in place — new
weights, a new tokenizer — under the same path; a key made of the path would then reuse what the old weights made.
So such a folder is keyed by the sha256 of its files (``folder_sha256``, the same digest as ``hash_folder``). A
folder inside a finished stage output (``runs/<run>/<stage>/<key>/model``: a pruned teacher, an imported GGUF
file, another student) is keyed by that output's stage, key and sha256 (``keyed_by_content``), not by where the run
folder lies. A hub id is keyed by its name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from kdflow.store.outputs import MANIFEST, OutputRef, file_sha256, hash_folder, read_manifest, write_atomic

SOURCE = "model.json"  # {"location": <folder relative to the stage output, absolute folder, or hub id>}
MODEL = "model"  # the folder a stage that makes a model saves it in (weights, tokenizer, chat template)
LOG_HISTORY = "log_history.json"  # the trainer's log history, beside a model trained here
STATE_ENV = "KDFLOW_STATE_DIR"  # where kdflow keeps small records across runs; default ~/.cache/kdflow
HASHES = "folder-sha256.json"
log = logging.getLogger(__name__)


def model_location(ref: OutputRef) -> str:
    location = json.loads((Path(ref.path) / SOURCE).read_text())["location"]
    local = Path(ref.path) / location
    return str(local) if not Path(location).is_absolute() and local.exists() else location


def write_location(stage_dir: Path, location: str) -> None:
    (Path(stage_dir) / SOURCE).write_text(json.dumps({"location": location}))


def state_dir() -> Path:
    """``$KDFLOW_STATE_DIR``, else ``~/.cache/kdflow``: small records that outlive a run (folder hashes, what a
    server said it serves), shared by every clone on the machine."""
    return Path(os.environ.get(STATE_ENV) or Path.home() / ".cache" / "kdflow")


def stage_output_root(path: str | Path) -> Path | None:
    """The finished stage output ``path`` lies in (``<run>/<stage>/<key>/...``: a folder whose manifest names the key
    its folder is called by), hence is content-addressed by that key; None where it lies in none."""
    path = Path(os.path.abspath(path))
    for folder in (path, *path.parents):
        if (folder / MANIFEST).is_file():
            manifest = read_manifest(folder)
            if bool(manifest) and str(manifest.get("key", "")).startswith(folder.name) and len(folder.name) == 16:
                return folder
            return None
    return None


def local_model_sha256(name: str | None) -> str | None:
    """The content hash a model a recipe names is keyed by: a local folder's files, or None where the name says
    what it holds (a hub id, a GGUF file keyed by its import stage, a folder inside a finished stage output)."""
    if not name or not Path(name).is_dir() or stage_output_root(name) is not None:
        return None
    return folder_sha256(Path(name))


def keyed_by_content(section):
    """``section`` as its stage key sees it: a local model folder in ``section.model`` replaced by
    ``sha256:<its files>``, so that new weights at the same path make a new key and the same weights moved to
    another path do not; a folder inside a finished stage output (a pruned start, another student) by
    ``output:<stage>/<key>/<path inside it>@<the output's sha256>``: where it lies is left out, so that a run folder
    copied or moved elsewhere keeps its keys, and what it holds is in, so that a parent rebuilt under its key (set
    aside as damaged and trained again) with other bytes retrains what started from it; the section as it is
    otherwise (a hub id: its key exactly as before)."""
    name = section.model
    if not name or not Path(name).is_dir():
        return section
    if (root := stage_output_root(name)) is not None:  # one walk up the parents, not two
        inside = Path(os.path.abspath(name)).relative_to(root).as_posix()
        sha256 = read_manifest(root)["sha256"]
        return section.model_copy(update={"model": f"output:{root.parent.name}/{root.name}/{inside}@{sha256}"})
    return section.model_copy(update={"model": f"sha256:{folder_sha256(Path(name))}"})


# Hashing a 15 GB model folder takes ~10 s from the page cache and minutes from a cold disk, and a key is computed
# several times per run (the cache policy, the task body, each seed) and again in every new process. So the digest
# is kept by the folder's stat signature — every file's relative name, size, mtime_ns, ctime_ns and inode — in
# memory and in a small JSON file in state_dir() (per machine, beside no run: the key is computed before any run
# folder is known, and the same folder serves many runs). Any write to a file changes its mtime and ctime (ctime
# cannot be set back), and a file replaced by a rename has a new inode, so a changed folder is hashed again; a stale
# or damaged record file only costs a rehash. Writes from two processes race harmlessly (the last one wins).
_hashes: dict[str, tuple[str, str]] = {}  # folder -> (signature digest, folder sha256)
_hashes_lock = threading.Lock()


def folder_sha256(folder: Path) -> str:
    """``hash_folder(folder)``, computed again only when a file of the folder changed since it was last hashed."""
    return _remembered(Path(folder), hash_folder)


def file_sha256_remembered(file: Path) -> str:
    """``file_sha256(file)``, likewise computed again only when the file changed (an imported logit dataset: its
    files' digests key the import, and a key is computed several times per run)."""
    return _remembered(Path(file), file_sha256)


def _remembered(path: Path, digest_of) -> str:
    path = Path(os.path.abspath(path))
    signature = _signature(path)
    with _hashes_lock:
        if not _hashes:
            _hashes.update(_load_hashes())
        known = _hashes.get(str(path))
    if known is not None and known[0] == signature:
        return known[1]
    digest = digest_of(path)
    with _hashes_lock:
        _hashes[str(path)] = (signature, digest)
        _save_hashes(dict(_hashes))
    return digest


def _signature(path: Path) -> str:
    files = [path] if path.is_file() else (f for f in path.rglob("*") if f.is_file() and f.name != MANIFEST)
    stats = sorted((str(f.relative_to(path)), f.stat()) for f in files)
    text = json.dumps([(n, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for n, st in stats])
    return hashlib.sha256(text.encode()).hexdigest()


def _load_hashes() -> dict[str, tuple[str, str]]:
    try:
        records = json.loads((state_dir() / HASHES).read_text())
        return {str(k): (str(v[0]), str(v[1])) for k, v in records.items()}
    except (OSError, ValueError, TypeError, AttributeError, IndexError):  # none yet, or damaged: hash again
        return {}


def _save_hashes(records: dict[str, tuple[str, str]]) -> None:
    try:
        state_dir().mkdir(parents=True, exist_ok=True)
        write_atomic(state_dir() / HASHES, json.dumps(records, indent=1))
    except OSError as e:  # a read-only home: the digest still holds for this process
        log.warning(f"could not keep folder hashes in {state_dir() / HASHES} ({e}); they are computed again next run")
