"""The stage contract: every stage writes one folder, atomically, with ``manifest.json`` written last.

``runs/<run>/<stage>/<key>/`` holds a stage's output; ``key`` comes from the content the stage was made
from (see ``content_key``), so two different inputs never share a folder and the same inputs always map to
the same one. A folder is built under a temporary name and renamed into place only after its manifest is
written: no manifest, no output. Stages pass each other small ``OutputRef``s, never the data itself.

A run folder on remote storage (``run.root: s3://…``, kdflow/remote.py) is wired in here, where every stage looks
up and finishes its output, rather than in each flow: every stage, and every stage flow rerun alone, gets it at
once with no flow or task changed. ``existing_output`` downloads an output that only the remote has, and
``building`` uploads each finished one (manifest last).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from kdflow import remote

MANIFEST = "manifest.json"
# Test hook for failure-and-rerun tests (tests/test_rerun.py): KDFLOW_FAIL_STAGE=<stage folder name> makes that
# stage fail as it starts building its output. Unset in normal use.
FAIL_STAGE_ENV = "KDFLOW_FAIL_STAGE"


class InjectedFailure(RuntimeError):
    """Raised where KDFLOW_FAIL_STAGE names the stage being built."""


class OutputRef(BaseModel):
    """A small, content-addressed pointer to a finished stage output."""

    stage: str
    key: str
    path: str
    sha256: str
    rows: int | None = None

    def is_complete(self) -> bool:
        """The folder still exists, its manifest is there, and it is the content this ref was made from."""
        manifest = Path(self.path) / MANIFEST
        if not manifest.is_file():
            return False
        try:
            return json.loads(manifest.read_text())["sha256"] == self.sha256
        except (json.JSONDecodeError, KeyError):
            return False

    def manifest(self) -> dict:
        return json.loads((Path(self.path) / MANIFEST).read_text())


def canonical(value):
    """A JSON-able view of a key input: refs by content hash, pydantic models by their fields."""
    if isinstance(value, OutputRef):
        return {"ref": value.stage, "sha256": value.sha256}
    if isinstance(value, BaseModel):
        # Settings left at their defaults are left out, so that a new option added to a section (at a default
        # that keeps the old behaviour) does not change every existing output's key and redo finished work.
        return canonical(value.model_dump(mode="json", exclude_defaults=True,
                                          exclude=getattr(value, "__throughput_fields__", set())))
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        raise TypeError(f"paths are not content; pass the file's text or a ref instead of {value}")
    return value


def content_key(stage: str, version: str, inputs: dict) -> str:
    """sha256 of (stage, code version, inputs by content)."""
    payload = json.dumps({"stage": stage, "version": version, "inputs": canonical(inputs)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def hash_folder(path: Path) -> str:
    """sha256 over every file's relative name and bytes, in a fixed order (the manifest excluded)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def output_dir(run_dir: Path, stage: str, key: str) -> Path:
    return Path(run_dir) / stage / key[:16]


def existing_output(run_dir: Path, stage: str, key: str) -> OutputRef | None:
    """The ref of a complete output for this key, or None (missing, or no manifest: incomplete)."""
    final = output_dir(run_dir, stage, key)
    sync(run_dir, stage, final.name)
    manifest = final / MANIFEST
    if not manifest.is_file():
        return None
    m = json.loads(manifest.read_text())
    return OutputRef(stage=stage, key=key, path=str(final.resolve()), sha256=m["sha256"], rows=m.get("rows"))


@contextmanager
def building(run_dir: Path, stage: str, key: str):
    """Yield a temporary folder to build the output in; on success it is renamed into place.

    Use ``finish(tmp, ...)`` inside the block to write the manifest. On an exception the temporary
    folder is removed and nothing is left under the final name.
    """
    if os.environ.get(FAIL_STAGE_ENV) == stage:
        raise InjectedFailure(f"{FAIL_STAGE_ENV}={stage}: injected failure (a test hook; unset it to run the stage)")
    final = output_dir(run_dir, stage, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise RuntimeError(f"stage {stage!r} built {tmp} without calling finish(): no manifest, not complete")
        _move_into_place(tmp, final)
        if url := remote_url(run_dir, stage, final.name):
            remote.push(final, url)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remote_url(run_dir: Path, stage: str, name: str) -> str | None:
    """Where the output folder ``name`` of a run folder on remote storage goes; None for a local run folder."""
    url = remote.bound_url(run_dir)
    return None if url is None else f"{url}/{stage}/{name}"


def sync(run_dir: Path, stage: str, name: str) -> None:
    """For a run folder on remote storage: download the output folder ``name`` when only the remote has it, and
    upload it when only this machine has it (its upload was cut short). A plain local run folder: nothing."""
    url = remote_url(run_dir, stage, name)
    if url is None:
        return
    final = Path(run_dir) / stage / name
    if (final / MANIFEST).is_file():
        if not remote.exists_complete(url):
            remote.push(final, url)
    elif remote.exists_complete(url):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".pull-{name}-{uuid.uuid4().hex[:8]}"
        try:
            remote.pull(url, tmp)
            # Verified before it is trusted: a damaged copy, or one replaced while it was read, is not taken; the
            # stage builds the output again and its upload replaces the remote copy.
            if hash_folder(tmp) == json.loads((tmp / MANIFEST).read_text())["sha256"]:
                _move_into_place(tmp, final)
            else:
                logging.getLogger(__name__).warning(f"{url}: files do not match its manifest; not used")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def exclusive(run_dir: Path, stage: str, key: str):
    """Hold the lock of one stage output while it is built: a second run of the same content (another flow
    run, another worker) waits here, then finds the output finished, instead of training beside the first
    and sharing its resumable work folder. The lock file (``.lock-<key>``, empty) stays; the kernel drops
    the lock when the holder exits, also on a crash or a kill."""
    folder = Path(run_dir) / stage
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".lock-{key[:16]}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _move_into_place(tmp: Path, final: Path) -> None:
    # Concurrent builds of the same key (two flow runs, two workers) serialise here: without the lock one
    # run could take a folder another run had just completed for a stale one and set it aside.
    # The lock is on the stage folder itself, so it leaves no file behind.
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if (final / MANIFEST).is_file():
            return  # a concurrent run finished the same content first; keep theirs, drop ours
        if final.exists():  # an incomplete folder (no manifest): never trusted, set aside and removed
            trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
    finally:
        os.close(fd)  # closing releases the lock


def finish(tmp: Path, stage: str, key: str, *, inputs: dict, rows: int | None = None, **extra) -> None:
    """Write the manifest (last): what the output was made from, its content hash, counts and extras."""
    manifest = {
        "stage": stage,
        "key": key,
        "sha256": hash_folder(tmp),
        "rows": rows,
        "inputs": canonical(inputs),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        **extra,
    }
    part = tmp / f".{MANIFEST}.part"
    part.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(part, tmp / MANIFEST)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "datasets", "prefect"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
