"""Resuming from whole checkpoints only, and a full disk said in so many words.

transformers 5 writes ``checkpoint-<step>`` in place — the weights, the optimizer and scheduler, the RNG states, and
``trainer_state.json`` last — so a kill or a full disk mid-save leaves a folder without it. transformers'
``get_last_checkpoint`` picks the highest step whatever the folder holds, so every rerun would fail
(``FileNotFoundError: …/trainer_state.json``) though an earlier checkpoint is whole. Here a torn checkpoint is
renamed ``torn-checkpoint-<step>`` (outside the ``checkpoint-*`` pattern the Trainer resumes from and rotates), with a
warning, and training resumes from the newest whole one.

A save that fails for want of space says "disk full", the folder and the fix. torch's writer loses the errno on the
way (``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos …``, measured with a full tmpfs), so
for it the free space left on the folder's disk decides.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # transformers.trainer_utils' pattern, matched on the whole name
TORN = "torn-"
STATE = "trainer_state.json"  # written last
# Below this much free space, a torch write that failed without an errno is taken for a full disk: such a write
# stops where the disk is full, so what is left is ~0 (0 bytes on the full tmpfs measured).
LOW_SPACE = 256 * 2**20
FULL_MESSAGES = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
TORCH_WRITE = ("inline_container.cc", "PytorchStreamWriter")


def whole(folder: Path) -> bool:
    """A checkpoint whose last file, ``trainer_state.json``, was written completely."""
    try:
        state = json.loads((Path(folder) / STATE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def last_checkpoint(folder: Path | None, set_aside: bool = True) -> str | None:
    """The newest whole ``checkpoint-<step>`` in ``folder``, or None. Torn ones newer than it are renamed
    ``torn-checkpoint-<step>`` with a warning when ``set_aside`` (the main process only, under ``accelerate
    launch``; the others just pass over them)."""
    if folder is None or not Path(folder).is_dir():
        return None
    found = [(int(m[1]), p) for p in Path(folder).iterdir() if (m := CHECKPOINT.fullmatch(p.name)) and p.is_dir()]
    for _, path in sorted(found, reverse=True):
        if whole(path):
            return str(path)
        if set_aside:
            _set_aside(path)
    return None


def _set_aside(path: Path) -> None:
    target, n = path.with_name(TORN + path.name), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{TORN}{path.name}.{n}")
    path.rename(target)
    log.warning(
        f"{path}: a torn checkpoint (no complete {STATE}: its save was cut short by a kill or a full disk); "
        f"set aside as {target.name}, training resumes from the newest whole checkpoint, if any"
    )


class DiskFull(OSError):
    """A save failed because the disk it writes to is full."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def free_bytes(folder: Path) -> int | None:
    """Free space on the disk holding ``folder`` (or its nearest existing parent); None if it cannot be read."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full(error: BaseException, folder: Path) -> DiskFull | None:
    """``error`` said as "disk full" if it is one (module docstring), naming ``folder`` and the fix; else None."""
    chain = list(_chain(error))
    said = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain) or any(
        m in str(e) for e in chain for m in FULL_MESSAGES
    )
    free = free_bytes(folder)
    torch_write = any(m in str(e) for e in chain for m in TORCH_WRITE)
    if not (said or (torch_write and free is not None and free < LOW_SPACE)):
        return None
    left = "unknown" if free is None else f"{free / 2**20:.0f} MiB"
    return DiskFull(
        errno.ENOSPC,
        f"disk full while saving to {folder} ({left} free on its disk; "
        f"{type(error).__name__}: {error}). Free space on that disk, or put the run folder "
        "(run.root) on a larger one, then rerun: training resumes from the newest whole "
        "checkpoint (a torn one is set aside)",
    )


@contextlib.contextmanager
def saving(folder: Path) -> Iterator[None]:
    """Raise ``DiskFull`` for a failure inside the block that ``disk_full`` recognises; anything else as it came."""
    try:
        yield
    except Exception as e:
        full = disk_full(e, folder)
        if full is None:
            raise
        raise full from e
