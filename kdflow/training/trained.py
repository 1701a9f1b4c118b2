"""A trained model kept in its work folder until the stage output that holds it is complete.

A stage builds its output in a temporary folder that is removed when anything in it fails, and work that must outlive
a failure goes to the stage's work folder (``StageOutput.work``). Training's result is such work: the code that runs
after the trainer has finished (the manifest's figures, a summary read from the log history) can fail too, and
whatever trained the model must not be lost to it. So a student trains into ``<work>/trained.part``; once everything
training writes is there, a seal (``trained.json``: every file's size, and what the attempt recorded) is written last
and the folder renamed ``<work>/trained``. A rerun that finds it whole links its files into the new output instead of
training again. The work folder, checkpoints and all, is removed by the stage once its output is in place.

    trained = sealed(work)
    if trained is None:
        part = fresh(work)
        ...                                   # train into part
        trained = seal(work, seconds=...)
    link_tree(work / TRAINED, tmp)            # then write the manifest; remove work once the output is in place
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

TRAINED = "trained"  # in the work folder: the sealed result of training
PART = "trained.part"  # in the work folder: training writes here until it is sealed
SEAL = "trained.json"  # in TRAINED, written last
log = logging.getLogger(__name__)


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def sealed(work: Path) -> dict | None:
    """What the attempt that trained into ``work`` recorded, if its result is there whole (every file the seal lists,
    at its size); else None. A damaged result is removed, with a warning, so that training runs again."""
    folder = Path(work) / TRAINED
    try:
        record = json.loads((folder / SEAL).read_text())
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and record.get("files") == {k: v for k, v in _files(folder).items() if k != SEAL}:
        return record
    if folder.exists():
        log.warning(f"{folder}: a trained model that does not match its seal ({SEAL}); removed, training runs again")
        shutil.rmtree(folder, ignore_errors=True)
    return None


def fresh(work: Path) -> Path:
    """An empty ``<work>/trained.part`` to train into (what an attempt cut short left there is removed: it was never
    sealed, and the checkpoints beside it are what a rerun resumes from)."""
    part = Path(work) / PART
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    return part


def seal(work: Path, **record) -> dict:
    """Seal ``<work>/trained.part`` as ``<work>/trained``: its files synced to disk, then the seal written (listing
    them, with ``record``), then the folder renamed, so that a crash at any point leaves no seal over a torn file."""
    part, folder = Path(work) / PART, Path(work) / TRAINED
    files = _files(part)
    for name in files:
        fd = os.open(part / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    record = {**record, "files": files}
    (part / SEAL).write_text(json.dumps(record, indent=1))
    shutil.rmtree(folder, ignore_errors=True)  # one that did not match its seal
    os.rename(part, folder)
    return record


def link_tree(source: Path, target: Path, skip: tuple[str, ...] = (SEAL,)) -> None:
    """Every file under ``source`` (but those named in ``skip``, relative to it) at the same place under ``target``:
    hard-linked, so that gigabytes of weights are not copied and ``source`` stays whole, or copied where the file
    system refuses links."""
    for file in sorted(p for p in Path(source).rglob("*") if p.is_file()):
        if str(file.relative_to(source)) in skip:
            continue
        to = Path(target) / file.relative_to(source)
        to.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, to)
        except OSError:
            shutil.copy2(file, to)
